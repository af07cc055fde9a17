namespace Pipeline.Bench;

/// <summary>
/// The reference for a frozen-encoder head: L2-regularised binary logistic regression solved exactly (Newton's
/// method with a Cholesky solve, to convergence), on the same pooled features the trainer used. Its best validation
/// accuracy over a sweep of the penalty is the ceiling a linear head can reach on that split (optimistic: the
/// penalty is chosen on the validation set itself).
/// </summary>
public static class LinearProbe
{
    public static readonly double[] Penalties = [0.3, 1, 3, 10, 30];

    /// <summary>Validation accuracy of the converged model for each penalty (the sum of squared weights times <c>penalty / 2</c>).</summary>
    public static IEnumerable<(double Penalty, double Accuracy)> Sweep(List<float[]> train, int[] trainLabels, List<float[]> validation, int[] validationLabels) =>
        Penalties.Select(penalty => (penalty, Accuracy(Fit(train, trainLabels, penalty), validation, validationLabels)));

    public static double[] Fit(List<float[]> x, int[] y, double penalty)
    {
        var d = x[0].Length + 1; // the last weight is the bias, not penalised
        var w = new double[d];
        for (var iteration = 0; iteration < 50; iteration++)
        {
            var gradient = new double[d];
            var hessian = new double[d, d];
            for (var i = 0; i < x.Count; i++)
            {
                var p = 1 / (1 + Math.Exp(-Score(w, x[i])));
                var error = p - y[i];
                var curvature = p * (1 - p);
                for (var j = 0; j < d; j++)
                {
                    var xj = j < d - 1 ? x[i][j] : 1.0;
                    gradient[j] += error * xj;
                    for (var k = 0; k <= j; k++)
                    {
                        hessian[j, k] += curvature * xj * (k < d - 1 ? x[i][k] : 1.0);
                    }
                }
            }

            for (var j = 0; j < d - 1; j++)
            {
                gradient[j] += penalty * w[j];
                hessian[j, j] += penalty;
            }

            hessian[d - 1, d - 1] += 1e-9;
            var step = CholeskySolve(hessian, gradient);
            var norm = 0.0;
            for (var j = 0; j < d; j++)
            {
                w[j] -= step[j];
                norm += step[j] * step[j];
            }

            if (norm < 1e-14)
            {
                break;
            }
        }

        return w;
    }

    public static double Accuracy(double[] w, List<float[]> x, int[] y) =>
        x.Count == 0 ? 0 : (double)x.Select((v, i) => (Score(w, v) > 0 ? 1 : 0) == y[i]).Count(correct => correct) / x.Count;

    private static double Score(double[] w, float[] v)
    {
        var z = w[^1];
        for (var j = 0; j < v.Length; j++)
        {
            z += w[j] * v[j];
        }

        return z;
    }

    /// <summary>Solves A s = b for a symmetric positive-definite A given by its lower triangle.</summary>
    private static double[] CholeskySolve(double[,] a, double[] b)
    {
        var n = b.Length;
        var l = new double[n, n];
        for (var i = 0; i < n; i++)
        {
            for (var j = 0; j <= i; j++)
            {
                var s = a[i, j];
                for (var k = 0; k < j; k++)
                {
                    s -= l[i, k] * l[j, k];
                }

                l[i, j] = i == j ? Math.Sqrt(s) : s / l[j, j];
            }
        }

        var y = new double[n];
        for (var i = 0; i < n; i++)
        {
            var s = b[i];
            for (var k = 0; k < i; k++)
            {
                s -= l[i, k] * y[k];
            }

            y[i] = s / l[i, i];
        }

        var x = new double[n];
        for (var i = n - 1; i >= 0; i--)
        {
            var s = y[i];
            for (var k = i + 1; k < n; k++)
            {
                s -= l[k, i] * x[k];
            }

            x[i] = s / l[i, i];
        }

        return x;
    }
}
