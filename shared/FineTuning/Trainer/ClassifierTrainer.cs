using System.Diagnostics;

namespace Pipeline.FineTuning.Trainer;

/// <summary>Examples as the trainer sees them: token ids (bag-of-embeddings) or pooled encoder features, and label ids.</summary>
public sealed record TrainingSet(List<int[]>? Tokens, List<float[]>? Features, int[] Labels)
{
    public int Count => Labels.Length;
}

/// <summary>The trained parameters: the classification head, and the embedding table when it was trained too.</summary>
public sealed record TrainedClassifier(float[] Weight, float[] Bias, float[]? Embeddings, int BestEpoch, List<EpochMetrics> Epochs);

/// <summary>Progress of training, reported after every batch (for heartbeats) and every epoch.</summary>
public readonly record struct TrainingProgress(int Epoch, long Step, long Steps, EpochMetrics? Completed);

/// <summary>
/// Trains a classification head (softmax regression on pooled encoder outputs) with AdamW, weight decay,
/// inverse-frequency class weights, linear warm-up and decay, and early stopping on validation loss. With
/// a bag-of-embeddings base it can train the embedding table too (masked mean pooling, sparse AdamW rows).
/// Single-threaded and seeded: the same inputs give the same model, bit for bit.
/// </summary>
public sealed class ClassifierTrainer(Hyperparameters hyper, int classes, int hidden)
{
    private const float Beta1 = 0.9f, Beta2 = 0.999f, Epsilon = 1e-8f;

    public TrainedClassifier Train(TrainingSet train, TrainingSet validation, float[]? embeddings, Action<TrainingProgress> progress, CancellationToken cancellationToken)
    {
        var trainEmbeddings = embeddings is not null && hyper.Trainable == FineTuneSpec.TrainHeadAndEmbeddings;
        var weight = new float[classes * hidden];
        var bias = new float[classes];
        var table = embeddings is null ? null : (float[])embeddings.Clone();
        var random = new Random(hyper.Seed);
        // Small seeded head: the base's features carry the signal; the head starts near uniform.
        for (var i = 0; i < weight.Length; i++)
        {
            weight[i] = (float)((random.NextDouble() - 0.5) * 0.02);
        }

        var classWeights = ClassWeights(train.Labels);
        var adamW = new Moments(weight.Length);
        var adamB = new Moments(bias.Length);
        var adamE = trainEmbeddings ? new Moments(table!.Length) : null;
        var rowStep = trainEmbeddings ? new int[table!.Length / hidden] : null;

        var batches = (train.Count + hyper.BatchSize - 1) / hyper.BatchSize;
        var steps = (long)batches * hyper.Epochs;
        var warmup = Math.Max(1, (long)(steps * hyper.WarmupFraction));
        var order = Enumerable.Range(0, train.Count).ToArray();
        var history = new List<EpochMetrics>();
        var best = (Loss: double.MaxValue, Epoch: 0, Weight: weight, Bias: bias, Table: table);
        var pooled = new float[hidden];
        var gradW = new float[weight.Length];
        var gradB = new float[classes];
        var gradH = new float[hidden];
        var probabilities = new float[classes];
        var touched = new Dictionary<int, float[]>();
        long step = 0;
        for (var epoch = 1; epoch <= hyper.Epochs; epoch++)
        {
            var clock = Stopwatch.StartNew();
            Shuffle(order, new Random(hyper.Seed * 7919 + epoch));
            double lossSum = 0;
            for (var batchStart = 0; batchStart < order.Length; batchStart += hyper.BatchSize)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var batchEnd = Math.Min(order.Length, batchStart + hyper.BatchSize);
                var batchSize = batchEnd - batchStart;
                Array.Clear(gradW);
                Array.Clear(gradB);
                touched.Clear();
                for (var b = batchStart; b < batchEnd; b++)
                {
                    var example = order[b];
                    Pool(train, example, table, pooled);
                    var label = train.Labels[example];
                    var loss = Forward(weight, bias, pooled, label, probabilities);
                    var scale = classWeights[label] / batchSize;
                    lossSum += loss * classWeights[label];
                    Array.Clear(gradH);
                    for (var c = 0; c < classes; c++)
                    {
                        var g = (probabilities[c] - (c == label ? 1f : 0f)) * scale;
                        gradB[c] += g;
                        var row = c * hidden;
                        for (var h = 0; h < hidden; h++)
                        {
                            gradW[row + h] += g * pooled[h];
                            gradH[h] += g * weight[row + h];
                        }
                    }

                    if (trainEmbeddings)
                    {
                        var ids = train.Tokens![example];
                        var share = 1f / ids.Length;
                        foreach (var id in ids)
                        {
                            if (!touched.TryGetValue(id, out var grad))
                            {
                                touched[id] = grad = new float[hidden];
                            }

                            for (var h = 0; h < hidden; h++)
                            {
                                grad[h] += gradH[h] * share;
                            }
                        }
                    }
                }

                step++;
                var rate = (float)(hyper.LearningRate * (step <= warmup ? (double)step / warmup : Math.Max(0.0, (double)(steps - step) / Math.Max(1, steps - warmup))));
                adamW.Step(weight, gradW, 0, weight.Length, step, rate, (float)hyper.WeightDecay);
                adamB.Step(bias, gradB, 0, bias.Length, step, rate, 0f);
                if (trainEmbeddings)
                {
                    // Sparse rows, in id order (deterministic): each row's Adam step counts its own updates.
                    foreach (var id in touched.Keys.Order())
                    {
                        var grad = touched[id];
                        var offset = id * hidden;
                        var rowUpdates = ++rowStep![id];
                        adamE!.Step(table!, grad, offset, hidden, rowUpdates, rate, (float)hyper.WeightDecay, gradientOffset: -offset);
                    }
                }

                progress(new TrainingProgress(epoch, step, steps, null));
            }

            var (validationLoss, accuracy, macroF1) = Evaluate(validation, weight, bias, table, classWeights);
            var metrics = new EpochMetrics
            {
                Epoch = epoch,
                TrainLoss = Math.Round(lossSum / train.Count, 6),
                ValidationLoss = Math.Round(validationLoss, 6),
                ValidationAccuracy = Math.Round(accuracy, 6),
                ValidationMacroF1 = Math.Round(macroF1, 6),
                ExamplesPerSecond = Math.Round(train.Count / Math.Max(1e-6, clock.Elapsed.TotalSeconds), 1),
                Time = DateTimeOffset.UtcNow,
            };
            history.Add(metrics);
            progress(new TrainingProgress(epoch, step, steps, metrics));
            if (validationLoss < best.Loss - 1e-9)
            {
                best = (validationLoss, epoch, (float[])weight.Clone(), (float[])bias.Clone(), trainEmbeddings ? (float[])table!.Clone() : table);
            }
            else if (hyper.EarlyStoppingPatience > 0 && epoch - best.Epoch >= hyper.EarlyStoppingPatience)
            {
                break;
            }
        }

        return new TrainedClassifier(best.Weight, best.Bias, trainEmbeddings ? best.Table : null, best.Epoch, history);
    }

    /// <summary>Loss (class-weighted mean), accuracy and macro-F1 of the model on a set.</summary>
    public (double Loss, double Accuracy, double MacroF1) Evaluate(TrainingSet set, float[] weight, float[] bias, float[]? table, float[]? classWeights = null)
    {
        var pooled = new float[hidden];
        var probabilities = new float[classes];
        var confusion = new long[classes, classes];
        double loss = 0, weights = 0;
        for (var i = 0; i < set.Count; i++)
        {
            Pool(set, i, table, pooled);
            var label = set.Labels[i];
            var w = classWeights?[label] ?? 1f;
            loss += Forward(weight, bias, pooled, label, probabilities) * w;
            weights += w;
            var predicted = 0;
            for (var c = 1; c < classes; c++)
            {
                predicted = probabilities[c] > probabilities[predicted] ? c : predicted;
            }

            confusion[label, predicted]++;
        }

        long correct = 0;
        double f1Sum = 0;
        for (var c = 0; c < classes; c++)
        {
            correct += confusion[c, c];
            long predictedC = 0, actualC = 0;
            for (var k = 0; k < classes; k++)
            {
                predictedC += confusion[k, c];
                actualC += confusion[c, k];
            }

            var precision = predictedC == 0 ? 0 : (double)confusion[c, c] / predictedC;
            var recall = actualC == 0 ? 0 : (double)confusion[c, c] / actualC;
            f1Sum += precision + recall == 0 ? 0 : 2 * precision * recall / (precision + recall);
        }

        return set.Count == 0 ? (0, 0, 0) : (loss / weights, (double)correct / set.Count, f1Sum / classes);
    }

    /// <summary>The head's class probabilities for one feature vector (what the merged model must reproduce).</summary>
    public float[] Probabilities(float[] weight, float[] bias, float[] features)
    {
        var probabilities = new float[classes];
        Forward(weight, bias, features, 0, probabilities);
        return probabilities;
    }

    /// <summary>The majority class's share of a set: the accuracy a model that learned nothing gets.</summary>
    public static double MajorityBaseline(int[] labels, int classes) =>
        labels.Length == 0 ? 0 : (double)Enumerable.Range(0, classes).Max(c => labels.Count(l => l == c)) / labels.Length;

    private void Pool(TrainingSet set, int example, float[]? table, float[] pooled)
    {
        if (set.Features is not null)
        {
            set.Features[example].CopyTo(pooled, 0);
            return;
        }

        // Masked mean of the token embeddings, as the exported graph computes it.
        Array.Clear(pooled);
        var ids = set.Tokens![example];
        foreach (var id in ids)
        {
            var offset = id * hidden;
            for (var h = 0; h < hidden; h++)
            {
                pooled[h] += table![offset + h];
            }
        }

        for (var h = 0; h < hidden; h++)
        {
            pooled[h] /= Math.Max(1, ids.Length);
        }
    }

    private float Forward(float[] weight, float[] bias, float[] pooled, int label, float[] probabilities)
    {
        var max = float.MinValue;
        for (var c = 0; c < classes; c++)
        {
            var z = bias[c];
            var row = c * hidden;
            for (var h = 0; h < hidden; h++)
            {
                z += weight[row + h] * pooled[h];
            }

            probabilities[c] = z;
            max = Math.Max(max, z);
        }

        var sum = 0f;
        for (var c = 0; c < classes; c++)
        {
            probabilities[c] = MathF.Exp(probabilities[c] - max);
            sum += probabilities[c];
        }

        for (var c = 0; c < classes; c++)
        {
            probabilities[c] /= sum;
        }

        return -MathF.Log(Math.Max(probabilities[label], 1e-12f));
    }

    private float[] ClassWeights(int[] labels)
    {
        var weights = Enumerable.Repeat(1f, classes).ToArray();
        if (!hyper.ClassWeights || labels.Length == 0)
        {
            return weights;
        }

        for (var c = 0; c < classes; c++)
        {
            var n = labels.Count(l => l == c);
            weights[c] = n == 0 ? 0f : (float)labels.Length / (classes * n);
        }

        return weights;
    }

    private static void Shuffle(int[] order, Random random)
    {
        for (var i = order.Length - 1; i > 0; i--)
        {
            var j = random.Next(i + 1);
            (order[i], order[j]) = (order[j], order[i]);
        }
    }

    /// <summary>AdamW's first and second moments for one parameter tensor.</summary>
    private sealed class Moments(int size)
    {
        private readonly float[] _m = new float[size];
        private readonly float[] _v = new float[size];

        public void Step(float[] parameters, float[] gradient, int offset, int count, long step, float rate, float weightDecay, int gradientOffset = 0)
        {
            var correction1 = 1 - MathF.Pow(Beta1, step);
            var correction2 = 1 - MathF.Pow(Beta2, step);
            for (var i = offset; i < offset + count; i++)
            {
                var g = gradient[i + gradientOffset];
                _m[i] = Beta1 * _m[i] + (1 - Beta1) * g;
                _v[i] = Beta2 * _v[i] + (1 - Beta2) * g * g;
                var update = _m[i] / correction1 / (MathF.Sqrt(_v[i] / correction2) + Epsilon);
                parameters[i] -= rate * (update + weightDecay * parameters[i]);
            }
        }
    }
}

/// <summary>
/// Standardises frozen features (per dimension: minus the training mean, over the training standard deviation),
/// so that one learning rate suits any encoder's scale (an L2-normalised vector has tiny components); the trained
/// head is folded back (<see cref="Fold"/>) to read the raw features the shipped graph computes.
/// </summary>
public sealed record FeatureScaler(float[] Mean, float[] Scale)
{
    public static FeatureScaler Fit(List<float[]> train)
    {
        var hidden = train[0].Length;
        var mean = new double[hidden];
        var square = new double[hidden];
        foreach (var vector in train)
        {
            for (var h = 0; h < hidden; h++)
            {
                mean[h] += vector[h];
                square[h] += (double)vector[h] * vector[h];
            }
        }

        var m = new float[hidden];
        var scale = new float[hidden];
        for (var h = 0; h < hidden; h++)
        {
            m[h] = (float)(mean[h] / train.Count);
            var variance = Math.Max(0, (square[h] / train.Count) - (m[h] * (double)m[h]));
            scale[h] = (float)Math.Sqrt(variance) is var sd && sd > 1e-6f ? sd : 1f;
        }

        return new FeatureScaler(m, scale);
    }

    public List<float[]> Apply(List<float[]> vectors) =>
        [.. vectors.Select(v =>
        {
            var z = new float[v.Length];
            for (var h = 0; h < v.Length; h++)
            {
                z[h] = (v[h] - Mean[h]) / Scale[h];
            }

            return z;
        })];

    /// <summary>The head that gives on raw features what (<paramref name="weight"/>, <paramref name="bias"/>) gives on standardised ones.</summary>
    public (float[] Weight, float[] Bias) Fold(float[] weight, float[] bias)
    {
        var hidden = Mean.Length;
        var w = new float[weight.Length];
        var b = (float[])bias.Clone();
        for (var c = 0; c < bias.Length; c++)
        {
            double shift = 0;
            for (var h = 0; h < hidden; h++)
            {
                w[(c * hidden) + h] = weight[(c * hidden) + h] / Scale[h];
                shift += (double)w[(c * hidden) + h] * Mean[h];
            }

            b[c] -= (float)shift;
        }

        return (w, b);
    }
}
