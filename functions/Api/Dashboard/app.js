// The dashboard: runs, a run, its training curves, batches and lineage, and upload. Hash routes
// (#/, #/runs/<id>, #/batches, #/batches/<id>, #/upload); every page reads the /api routes and polls
// while something moves.
import { ApiError, artifactPath, downloadUrl, firstLines, getJson, listFolder, postJson, uploadToBlob } from './api.js';
import { lineChart } from './chart.js';

const pollMs = 1500;
const statuses = ['queued', 'running', 'succeeded', 'failed', 'cancelled', 'completed_with_failures'];
const finalStatuses = new Set(['succeeded', 'failed', 'cancelled', 'completed_with_failures']);
const stageOrder = ['ingest', 'preprocess', 'finetune', 'inference'];

// What to do about a failed run, by error code (the message says what was wrong).
const remedies = {
  EmptyFile: 'Upload a file with records in it.',
  Utf16Encoding: 'Re-save the file as UTF-8 and upload it again.',
  BinaryFile: 'Upload the uncompressed text file (JSONL, CSV or TSV), not an archive or binary.',
  FileTooLarge: 'Split the file, or raise Pipeline:Ingestion:MaxFileBytes.',
  UnknownFormat: 'Say the format in the run spec (ingest.format, ingest.columns), as the message suggests.',
  TooManyInvalidRecords: 'Fix the lines listed in errors.jsonl (first rows below), or raise ingest.maxInvalidFraction in the run spec, and upload again.',
  NoValidRecords: 'No line was a valid record: check the format and the columns against errors.jsonl below.',
  InvalidRunSpec: 'Fix the run spec field the message names and submit again.',
  SourceNotFound: 'The file was deleted before it was read; upload it again.',
  SourceChanged: 'The file was overwritten before it was read; its new version has its own run.',
  InvalidHyperparameters: 'Fix the fineTune settings the message names.',
  TrainerFailed: 'See the job folder (status.json) for the trainer\'s error.',
  TimedOut: 'Raise fineTune.maxDurationMinutes, or train on less data.',
  PoisonMessage: 'An infrastructure failure repeated until the message was given up on; fix the cause in the message and submit again.',
  Cancelled: 'The run was cancelled; submit it again to redo it.',
};

// ---- small DOM helpers (text only: nothing from the API is parsed as HTML) ----
function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const badge = (status) => h('span', { class: `badge status-${statuses.includes(status) ? status : 'unknown'}` }, (status || 'unknown').replaceAll('_', ' '));
const number = (n) => (typeof n === 'number' ? n.toLocaleString('en-US', { maximumFractionDigits: 4 }) : String(n ?? ''));
const time = (t) => (t ? new Date(t).toLocaleString() : '');
const seconds = (ms) => (ms >= 60000 ? `${(ms / 60000).toFixed(1)} min` : `${(ms / 1000).toFixed(2)} s`);
const announce = (text) => { document.getElementById('announce').textContent = text; };
function facts(entries) {
  return h('dl', { class: 'facts' }, entries.filter(([, v]) => v !== undefined && v !== null && v !== '').flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}
function problemText(e) {
  return e instanceof ApiError && e.problem ? `${e.problem.title}: ${e.problem.detail}` : String(e.message || e);
}
function folderOf(ref) {
  return ref.slice(0, ref.lastIndexOf('/') + 1);
}
async function exists(ref) {
  const name = ref.slice(ref.lastIndexOf('/') + 1);
  return (await listFolder(folderOf(ref))).some((e) => e.name === name);
}

// ---- the router ----
let stopPage = () => {};
function route() {
  stopPage();
  const main = document.getElementById('main');
  const [, page, id] = (location.hash.replace(/^#/, '') || '/').split('/');
  const decoded = id ? decodeURIComponent(id) : undefined;
  document.querySelectorAll('[data-nav]').forEach((a) => a.removeAttribute('aria-current'));
  const nav = page === 'batches' ? 'batches' : page === 'upload' ? 'upload' : 'runs';
  document.querySelector(`[data-nav="${nav}"]`)?.setAttribute('aria-current', 'page');
  main.replaceChildren();
  const pages = { '': runsPage, runs: decoded ? runPage : runsPage, batches: decoded ? batchPage : batchesPage, upload: uploadPage };
  stopPage = (pages[page] ?? runsPage)(main, decoded) || (() => {});
}

/** Calls step now and every pollMs until it returns false or the page is left. */
function poll(step) {
  let timer = 0, stopped = false;
  const tick = async () => {
    let again = true;
    try {
      again = (await step()) !== false;
    } catch (e) {
      again = true;
      announce(problemText(e));
    }
    if (again && !stopped) timer = setTimeout(tick, pollMs);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---- Runs ----
function progressOf(run) {
  const c = run.counts || {};
  if (run.status !== 'running') return '';
  if (run.stage === 'inference' && c.inferenceRows) {
    const eta = c.inferenceEtaSeconds >= 0 ? `, ETA ${c.inferenceEtaSeconds} s` : '';
    return `${number(c.inferenceRowsDone ?? 0)} of ${number(c.inferenceRows)} rows${c.inferenceRowsPerSecond ? `, ${number(c.inferenceRowsPerSecond)} rows/s` : ''}${eta}`;
  }
  if (run.stage === 'finetune' && c.fineTuneEpochs) {
    const percent = c.fineTuneProgressPercent ?? 0;
    const done = Object.values(run.timingsMs || {}).reduce((a, b) => a + b, 0);
    const elapsed = Date.now() - new Date(run.createdAt).getTime() - done;
    const eta = percent > 0 && percent < 100 ? `, ETA ${Math.round((elapsed * (100 - percent)) / percent / 1000)} s` : '';
    return `epoch ${c.fineTuneEpoch ?? 0} of ${c.fineTuneEpochs}, ${percent}%${eta}`;
  }
  if (run.stage === 'preprocess' && c.preprocessRecords) return `${number(c.preprocessRecords)} records read`;
  if (run.stage === 'ingest' && c.records) return `${number(c.records)} records read`;
  return '';
}

function countsSummary(run) {
  const c = run.counts || {};
  const shown = ['records', 'invalid', 'trainRecords', 'validationRecords', 'inferenceRowsSucceeded', 'inferenceRowsFailed'].filter((k) => k in c);
  return shown.map((k) => `${k} ${number(c[k])}`).join(', ');
}

function stagesOf(run) {
  const names = Object.keys(run.stages || {}).sort((a, b) => stageOrder.indexOf(a) - stageOrder.indexOf(b));
  return h('span', { class: 'stages' }, names.map((s) => h('span', { class: `badge status-${run.stages[s]}`, title: `${s}: ${run.stages[s]}` }, s)));
}

function runsPage(main) {
  const filter = h('select', { id: 'status-filter' }, h('option', { value: '' }, 'All'), statuses.map((s) => h('option', { value: s }, s.replaceAll('_', ' '))));
  filter.value = new URLSearchParams(location.hash.split('?')[1] || '').get('status') || '';
  const updated = h('span', { class: 'muted', id: 'runs-updated' });
  const body = h('tbody');
  const caption = h('caption');
  main.append(
    h('h1', {}, 'Runs'),
    h('div', { class: 'bar' }, h('label', { for: 'status-filter' }, 'Status'), filter, updated),
    h('table', { id: 'runs' }, caption, h('thead', {}, h('tr', {}, ['Run', 'Status', 'Stage', 'Stages', 'Counts', 'Progress', 'Updated'].map((t) => h('th', { scope: 'col' }, t)))), body));
  let stop = () => {};
  const start = () => {
    stop();
    stop = poll(async () => {
      const query = filter.value ? `?status=${encodeURIComponent(filter.value)}` : '';
      const runs = await getJson(`/api/runs${query}`);
      caption.textContent = `${runs.length} run${runs.length === 1 ? '' : 's'}${filter.value ? ` ${filter.value.replaceAll('_', ' ')}` : ''}, newest first`;
      body.replaceChildren(...runs.map((run) => h('tr', { 'data-run-id': run.runId, 'data-status': run.status },
        h('td', {}, h('a', { href: `#/runs/${encodeURIComponent(run.runId)}`, class: 'mono' }, run.runId), h('div', { class: 'muted' }, run.source)),
        h('td', {}, badge(run.status)),
        h('td', {}, run.stage),
        h('td', {}, stagesOf(run)),
        h('td', {}, countsSummary(run)),
        h('td', {}, progressOf(run)),
        h('td', {}, time(run.updatedAt)))));
      if (runs.length === 0) body.append(h('tr', {}, h('td', { colspan: 7 }, 'No runs yet. Upload a file to start one.')));
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    });
  };
  filter.addEventListener('change', start);
  start();
  return () => stop();
}

// ---- A run ----
function timeline(run, events) {
  const spans = {};
  for (const e of events) {
    const s = (spans[e.stage] ??= { start: null, end: null, status: e.status });
    const t = new Date(e.time).getTime();
    if (e.type.endsWith('stage.started') && s.start === null) s.start = t;
    if (!e.type.endsWith('stage.started') && !e.type.endsWith('progress')) { s.end = t; }
    s.status = e.status;
  }
  const names = Object.keys(run.stages || {}).sort((a, b) => stageOrder.indexOf(a) - stageOrder.indexOf(b));
  const starts = names.map((n) => spans[n]?.start).filter((t) => t);
  const t0 = starts.length ? Math.min(...starts) : Date.now();
  const t1 = Math.max(Date.now() * (finalStatuses.has(run.status) ? 0 : 1), ...names.map((n) => spans[n]?.end ?? 0), t0 + 1);
  return h('ol', { class: 'timeline', id: 'timeline' }, names.map((name) => {
    const span = spans[name] ?? {};
    const status = run.stages[name];
    const start = span.start ?? t0;
    const end = span.end ?? (finalStatuses.has(status) ? start : Date.now());
    const ms = run.timingsMs?.[name] ?? end - start;
    const bar = h('span', { class: status });
    bar.style.left = `${(100 * (start - t0)) / (t1 - t0)}%`;
    bar.style.width = `${Math.max(0.5, (100 * (end - start)) / (t1 - t0))}%`;
    return h('li', { 'data-stage': name }, h('span', {}, h('strong', {}, name), ' ', badge(status)), h('span', { class: 'track', 'aria-hidden': 'true' }, bar), h('span', { class: 'num' }, seconds(ms)));
  }));
}

async function errorSection(run) {
  const section = h('section', { class: 'error', id: 'run-error', 'aria-labelledby': 'run-error-title' },
    h('h2', { id: 'run-error-title' }, 'Why it failed'),
    facts([['Code', h('code', { id: 'error-code' }, run.errorCode || 'unknown')], ['Error', run.error], ['What to do', remedies[run.errorCode] ?? 'Read the error and the report, fix the input or the settings, and submit again.']]));
  const links = [];
  if (run.reportPath) links.push(h('a', { href: downloadUrl(run.reportPath) }, 'report.json'));
  const quarantine = run.artifacts?.quarantine;
  let errorsRef = run.artifacts?.errors;
  if (quarantine) {
    const files = await listFolder(quarantine);
    for (const f of files) {
      if (f.name === 'errors.jsonl') errorsRef = f.path;
      else if (f.name !== 'report.json') links.push(h('a', { href: downloadUrl(f.path) }, `quarantined copy (${f.name})`));
    }
  }
  if (errorsRef && await exists(errorsRef)) {
    links.push(h('a', { href: downloadUrl(errorsRef) }, 'errors.jsonl'));
    const rows = (await firstLines(errorsRef, 10)).map((l) => { try { return JSON.parse(l); } catch { return { message: l }; } });
    if (rows.length) {
      section.append(h('table', { id: 'error-lines' }, h('caption', {}, 'First invalid lines (errors.jsonl)'),
        h('thead', {}, h('tr', {}, h('th', { scope: 'col', class: 'num' }, 'Line'), h('th', { scope: 'col' }, 'Code'), h('th', { scope: 'col' }, 'Message'))),
        h('tbody', {}, rows.map((r) => h('tr', {}, h('td', { class: 'num' }, r.line ?? r.row ?? ''), h('td', {}, h('code', {}, r.code ?? '')), h('td', {}, r.message ?? JSON.stringify(r)))))));
    }
  }
  if (links.length) section.append(h('p', {}, 'Files: ', links.flatMap((l, i) => (i ? [', ', l] : [l]))));
  return section;
}

function artifactsSection(run) {
  const rows = Object.entries(run.artifacts || {}).map(([name, ref]) => {
    if (!ref.endsWith('/')) return h('tr', {}, h('td', {}, name), h('td', { class: 'mono' }, ref), h('td', {}, h('a', { href: downloadUrl(ref), 'aria-label': `Download ${name}` }, 'download')));
    const details = h('details', {}, h('summary', {}, 'files'));
    details.addEventListener('toggle', async () => {
      if (!details.open || details.dataset.loaded) return;
      details.dataset.loaded = 'yes';
      const files = await listFolder(ref);
      details.append(h('ul', {}, files.length ? files.map((f) => h('li', {}, h('a', { href: downloadUrl(f.path) }, f.name), ` (${number(f.size)} bytes)`)) : h('li', {}, 'none yet')));
    }, { once: false });
    return h('tr', {}, h('td', {}, name), h('td', { class: 'mono' }, ref), h('td', {}, details));
  });
  return h('section', { 'aria-labelledby': 'artifacts-title' }, h('h2', { id: 'artifacts-title' }, 'Artifacts'),
    rows.length ? h('table', { id: 'artifacts' }, h('thead', {}, h('tr', {}, ['Name', 'Path', ''].map((t) => h('th', { scope: 'col' }, t)))), h('tbody', {}, rows)) : h('p', {}, 'None yet.'));
}

async function trainingSection(run) {
  const job = run.artifacts?.job;
  if (!job) return null;
  const files = await listFolder(job);
  const has = (n) => files.some((f) => f.name === n);
  const epochs = has('metrics.jsonl') ? (await firstLines(`${job}metrics.jsonl`, 1000)).map((l) => JSON.parse(l)) : [];
  const spec = has('spec.json') ? await getJson(artifactPath(`${job}spec.json`)) : null;
  const baseline = run.metrics?.majorityBaselineAccuracy;
  const section = h('section', { 'aria-labelledby': 'training-title', id: 'training' }, h('h2', { id: 'training-title' }, 'Training'));
  if (epochs.length === 0) {
    section.append(h('p', {}, 'Waiting for the first epoch…'));
  } else {
    const series = (key, name) => ({ key, name, values: epochs.map((e) => ({ x: e.epoch, y: e[key] })) });
    section.append(
      lineChart({ title: 'Loss per epoch', series: [series('trainLoss', 'train loss'), series('validationLoss', 'validation loss')] }),
      lineChart({ title: 'Validation accuracy and macro-F1 per epoch', range: [0, 1],
        series: [series('validationAccuracy', 'validation accuracy'), series('validationMacroF1', 'validation macro-F1')],
        lines: baseline !== undefined ? [{ key: 'baseline', name: 'majority baseline', y: baseline }] : [] }),
      h('details', {}, h('summary', {}, 'The numbers'), h('table', {}, h('thead', {}, h('tr', {}, ['Epoch', 'Train loss', 'Validation loss', 'Accuracy', 'Macro-F1', 'Examples/s'].map((t) => h('th', { scope: 'col', class: 'num' }, t)))),
        h('tbody', {}, epochs.map((e) => h('tr', {}, [e.epoch, e.trainLoss, e.validationLoss, e.validationAccuracy, e.validationMacroF1, e.examplesPerSecond].map((v) => h('td', { class: 'num' }, number(v)))))))));
  }
  if (spec) {
    section.append(h('div', { class: 'grid' },
      h('div', { class: 'panel' }, h('h3', {}, 'Model'), facts([['Base model', h('code', {}, spec.baseModel)], ['Output model', h('code', {}, spec.outputModelId)], ['Backend', spec.backend], ['Labels', (spec.labels || []).join(', ')]])),
      h('div', { class: 'panel' }, h('h3', {}, 'Hyperparameters'), facts(Object.entries(spec.hyperparameters || {}).map(([k, v]) => [k, String(v)])))));
  }
  return section;
}

function runPage(main, runId) {
  const head = h('div');
  const body = h('div');
  main.append(head, body);
  let lastKey = '';
  const actions = h('div', { class: 'bar', id: 'run-actions' });
  return poll(async () => {
    let run;
    try {
      run = await getJson(`/api/runs/${encodeURIComponent(runId)}`);
    } catch (e) {
      head.replaceChildren(h('h1', {}, 'Run not found'), h('p', {}, problemText(e)));
      return false;
    }
    const events = await getJson(`/api/runs/${encodeURIComponent(runId)}/events`);
    const key = `${run.updatedAt}|${events.length}`;
    if (key === lastKey) return !finalStatuses.has(run.status);
    lastKey = key;

    head.replaceChildren(
      h('h1', {}, 'Run ', h('span', { class: 'mono' }, run.runId)),
      h('div', { class: 'bar' }, h('span', { id: 'run-status' }, badge(run.status)), h('span', {}, 'stage ', h('strong', {}, run.stage)), h('span', { class: 'muted' }, progressOf(run))),
      facts([['Source', h('a', { href: downloadUrl(run.source) }, run.source)], ['Dataset', run.datasetId], ['Created', time(run.createdAt)], ['Updated', time(run.updatedAt)], ['Attempt', run.attempt > 1 ? String(run.attempt) : ''], ['Last error', run.lastError]]),
      actions);
    actions.replaceChildren();
    if (!finalStatuses.has(run.status)) {
      actions.append(h('button', { class: 'danger', id: 'cancel-run', type: 'button', onclick: async (e) => {
        e.target.disabled = true;
        try {
          await postJson(`/api/runs/${encodeURIComponent(runId)}/cancel?reason=${encodeURIComponent('cancelled from the dashboard')}`);
          announce('Run cancelled.');
        } catch (error) {
          announce(problemText(error));
          e.target.disabled = false;
        }
      } }, 'Cancel run'));
    }
    const batchId = run.artifacts?.batch?.split('/')[1];
    if (batchId && (run.counts?.inferenceRowsFailed ?? 0) > 0 && finalStatuses.has(run.status)) {
      actions.append(retryButton(batchId));
    }

    const sections = [];
    if (run.error) sections.push(await errorSection(run));
    sections.push(h('section', { 'aria-labelledby': 'timeline-title' }, h('h2', { id: 'timeline-title' }, 'Stages'), timeline(run, events)));
    const counts = Object.entries(run.counts || {});
    const metrics = Object.entries(run.metrics || {});
    sections.push(h('div', { class: 'grid' },
      h('section', { class: 'panel', 'aria-labelledby': 'counts-title' }, h('h2', { id: 'counts-title' }, 'Counts'), counts.length ? facts(counts.map(([k, v]) => [k, number(v)])) : h('p', {}, 'None yet.')),
      metrics.length ? h('section', { class: 'panel', 'aria-labelledby': 'metrics-title' }, h('h2', { id: 'metrics-title' }, 'Metrics'), facts(metrics.map(([k, v]) => [k, number(v)]))) : null));
    const training = await trainingSection(run);
    if (training) sections.push(training);
    if (batchId && run.artifacts?.inferenceManifest) {
      sections.push(h('section', { 'aria-labelledby': 'batch-title' }, h('h2', { id: 'batch-title' }, 'Batch'),
        h('p', {}, h('a', { href: `#/batches/${encodeURIComponent(batchId)}` }, `Batch ${batchId}: throughput, results and lineage`))));
    }
    sections.push(artifactsSection(run));
    body.replaceChildren(...sections);
    return !finalStatuses.has(run.status);
  });
}

function retryButton(batchId) {
  return h('button', { type: 'button', id: 'retry-failed', class: 'secondary', onclick: async (e) => {
    e.target.disabled = true;
    try {
      const run = await postJson(`/api/batches/${encodeURIComponent(batchId)}/retry-failed`);
      location.hash = `#/runs/${encodeURIComponent(run.runId)}`;
    } catch (error) {
      announce(problemText(error));
      e.target.disabled = false;
    }
  } }, 'Retry failed rows');
}

// ---- Batches ----
function batchesPage(main) {
  const body = h('tbody');
  main.append(h('h1', {}, 'Batches'), h('table', { id: 'batches' }, h('caption', {}, 'Finished inference batches, newest first'),
    h('thead', {}, h('tr', {}, ['Batch', 'Status', 'Model', 'Rows', 'Failed', 'Rows/s', 'Padding', 'Provider', 'Finished'].map((t) => h('th', { scope: 'col' }, t)))), body));
  return poll(async () => {
    const batches = await getJson('/api/batches');
    body.replaceChildren(...batches.map((b) => h('tr', { 'data-batch-id': b.batchId },
      h('td', {}, h('a', { href: `#/batches/${encodeURIComponent(b.batchId)}`, class: 'mono' }, b.batchId)), h('td', {}, badge(b.status)), h('td', {}, b.modelId),
      h('td', { class: 'num' }, number(b.rows)), h('td', { class: 'num' }, number(b.failed)), h('td', { class: 'num' }, number(b.rowsPerSecond)),
      h('td', { class: 'num' }, `${(100 * b.paddingFraction).toFixed(1)}%`), h('td', {}, b.executionProvider), h('td', {}, time(b.createdAt)))));
    if (batches.length === 0) body.append(h('tr', {}, h('td', { colspan: 9 }, 'No finished batches yet.')));
    return true;
  });
}

function resultsTable(rows, labels) {
  const classification = rows.some((r) => r.probabilities);
  return h('table', { id: 'results' }, h('caption', {}, `First ${rows.length} results (results.jsonl)`),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col', class: 'num' }, 'Row'), h('th', { scope: 'col' }, 'Id'), classification ? [h('th', { scope: 'col' }, 'Label'), h('th', { scope: 'col' }, 'Probabilities')] : h('th', { scope: 'col' }, 'Embedding'))),
    h('tbody', {}, rows.map((r) => h('tr', {}, h('td', { class: 'num' }, r.row), h('td', { class: 'mono' }, r.custom_id ?? ''),
      classification
        ? [h('td', {}, h('strong', {}, r.label)), h('td', {}, (labels.length ? labels : Object.keys(r.probabilities)).map((label) => {
          const p = r.probabilities[label] ?? 0;
          const fill = h('span');
          fill.style.width = `${(100 * p).toFixed(1)}%`;
          return h('div', { class: 'prob' }, h('span', { class: 'mono' }, label), h('span', { class: 'meter', role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': 1, 'aria-valuenow': p.toFixed(4), 'aria-label': `probability of ${label}` }, fill), h('span', { class: 'num' }, p.toFixed(3)));
        }))]
        : h('td', { class: 'mono' }, `${(r.embedding || []).length} dimensions: ${(r.embedding || []).slice(0, 4).map((v) => v.toFixed(3)).join(', ')}…`)))));
}

function settings(object) {
  return Object.entries(object || {}).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => [k, typeof v === 'object' ? JSON.stringify(v) : String(v)]);
}

async function lineageSection(batch) {
  const models = await getJson('/api/models');
  const model = models.find((m) => m.modelId === batch.modelId);
  const lineage = model?.lineage || {};
  const datasets = lineage.datasetId ? await getJson('/api/datasets') : [];
  const dataset = datasets.find((d) => d.datasetId === lineage.datasetId);
  const preparedRef = lineage.datasetId && lineage.preparedId ? `datasets/${lineage.datasetId}/prepared/${lineage.preparedId}/manifest.json` : null;
  const prepared = preparedRef && await exists(preparedRef) ? await getJson(artifactPath(preparedRef)) : null;
  const step = (kind, title, entries, link) => h('li', { 'data-kind': kind }, h('strong', {}, `${kind}: `), h('span', { class: 'mono' }, title), link ? [' ', link] : null, facts(entries));
  const items = [
    step('Predictions', batch.batchId, [['Results', batch.results], ['Input', batch.input], ...settings(batch.options)], h('a', { href: downloadUrl(batch.results) }, 'download results')),
    model ? step('Model', model.modelId, [['Task', model.task], ['Labels', (model.labels || []).join(', ')], ['Base model', lineage.baseModel], ['Trained by', lineage.source], ...settings(lineage.hyperparameters), ...settings(lineage.metrics).filter(([k]) => /accuracy|F1|Baseline/i.test(k))]) : step('Model', batch.modelId, [['Lineage', 'not registered or without lineage']]),
    prepared ? step('Prepared data', prepared.preparedId, [['Tokenizer', JSON.stringify(prepared.tokenizer)], ['Max sequence length', String(prepared.maxSequenceLength)], ['Labels', (prepared.labels || []).join(', ')], ['Shards', String(prepared.shards?.length ?? 0)], ['Recipe', JSON.stringify(prepared.recipe)]], h('a', { href: downloadUrl(preparedRef) }, 'manifest.json')) : null,
    dataset ? step('Dataset', dataset.datasetId, [['Format', dataset.format], ['Record kind', dataset.recordKind], ['Records', number(dataset.records)], ['Invalid', number(dataset.invalid)], ['Labels', dataset.labelType], ['Run', h('a', { href: `#/runs/${encodeURIComponent(dataset.runId)}` }, dataset.runId)]], h('a', { href: downloadUrl(dataset.manifest) }, 'manifest.json')) : null,
    dataset ? step('Source file', dataset.sourceBlob, [], h('a', { href: downloadUrl(dataset.sourceBlob) }, 'download')) : null,
  ];
  return h('section', { 'aria-labelledby': 'lineage-title' }, h('h2', { id: 'lineage-title' }, 'Lineage'), h('ol', { class: 'lineage', id: 'lineage' }, items));
}

function batchPage(main, batchId) {
  return poll(async () => {
    const batch = (await getJson('/api/batches')).find((b) => b.batchId === batchId);
    if (!batch) {
      main.replaceChildren(h('h1', {}, `Batch ${batchId}`), h('p', {}, 'This batch has not finished yet (its manifest is written last). This page refreshes until it has.'));
      return true;
    }
    const models = await getJson('/api/models');
    const labels = models.find((m) => m.modelId === batch.modelId)?.labels || [];
    const rows = (await firstLines(batch.results, 20)).map((l) => JSON.parse(l));
    const codes = Object.entries(batch.errorCodes || {});
    main.replaceChildren(
      h('h1', {}, 'Batch ', h('span', { class: 'mono' }, batch.batchId)),
      h('div', { class: 'bar' }, badge(batch.status), h('a', { href: `#/runs/${encodeURIComponent(batch.runId)}` }, `run ${batch.runId}`), batch.failed > 0 ? retryButton(batch.batchId) : null),
      h('div', { class: 'grid' },
        h('section', { class: 'panel', 'aria-labelledby': 'throughput-title' }, h('h2', { id: 'throughput-title' }, 'Throughput'), facts([
          ['Rows', `${number(batch.succeeded)} of ${number(batch.rows)} scored`], ['Rows/s', `${number(batch.rowsPerSecond)} end to end`], ['Model rows/s', number(batch.modelRowsPerSecond)],
          ['Tokens/s', number(batch.tokensPerSecond)], ['Padding', `${(100 * batch.paddingFraction).toFixed(1)}%`], ['Execution provider', batch.executionProvider], ['Shards', number(batch.shards)]])),
        h('section', { class: 'panel', 'aria-labelledby': 'failures-title' }, h('h2', { id: 'failures-title' }, 'Failures'),
          codes.length ? h('table', { id: 'failures' }, h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Code'), h('th', { scope: 'col', class: 'num' }, 'Rows'))), h('tbody', {}, codes.map(([c, n]) => h('tr', {}, h('td', {}, h('code', {}, c)), h('td', { class: 'num' }, number(n))))))
            : h('p', {}, `No row failed (${number(batch.failed)}).`),
          batch.topError ? h('p', {}, `Most common: ${batch.topError}`) : null, h('p', {}, h('a', { href: downloadUrl(batch.errors) }, 'errors.jsonl')))),
      h('h2', {}, 'Results'), resultsTable(rows, labels), await lineageSection(batch));
    return false;
  });
}

// ---- Upload ----
function uploadPage(main) {
  const data = h('input', { type: 'file', id: 'upload-file', required: true, 'aria-describedby': 'upload-help' });
  const spec = h('input', { type: 'file', id: 'upload-spec', accept: '.json,application/json' });
  const status = h('p', { id: 'upload-status', role: 'status' });
  const submit = h('button', { type: 'submit', id: 'upload-start' }, 'Upload and start the run');
  const drop = h('div', { class: 'drop', id: 'drop-zone' }, h('p', {}, 'Drop a data file here (and optionally its run spec, a .json file), or choose them below.'));
  for (const type of ['dragenter', 'dragover']) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    const files = [...e.dataTransfer.files];
    const specFile = files.find((f) => f.name.endsWith('.json') && files.length > 1);
    const dataFile = files.find((f) => f !== specFile);
    const put = (input, file) => { const t = new DataTransfer(); t.items.add(file); input.files = t.files; };
    if (dataFile) put(data, dataFile);
    if (specFile) put(spec, specFile);
    status.textContent = `Chosen: ${files.map((f) => f.name).join(', ')}`;
  });

  const form = h('form', { id: 'upload-form', onsubmit: async (e) => {
    e.preventDefault();
    const file = data.files[0];
    if (!file) { status.textContent = 'Choose a data file first.'; data.focus(); return; }
    submit.disabled = true;
    try {
      let specJson;
      if (spec.files[0]) {
        try { specJson = JSON.parse(await spec.files[0].text()); } catch (error) { throw new Error(`The run spec is not valid JSON: ${error.message}`); }
      }
      status.textContent = 'Asking for an upload address…';
      const grant = await postJson('/api/uploads', { name: file.name, spec: specJson !== undefined });
      if (grant.specUrl) {
        // The spec first, beside the data, so that whoever picks the file up (the API's command or the blob event) reads it.
        await uploadToBlob(grant.specUrl, new Blob([JSON.stringify(specJson)], { type: 'application/json' }));
      }
      await uploadToBlob(grant.url, file, (done, total) => { status.textContent = `Uploading straight to blob storage: ${Math.round((100 * done) / Math.max(1, total))}%`; });
      status.textContent = 'Starting the run…';
      const run = await postJson('/api/runs', specJson !== undefined ? { blob: grant.blob, spec: specJson } : { blob: grant.blob });
      announce(`Run ${run.runId} started.`);
      location.hash = `#/runs/${encodeURIComponent(run.runId)}`;
    } catch (error) {
      status.textContent = problemText(error);
      submit.disabled = false;
    }
  } },
  drop,
  h('div', { class: 'form-row' }, h('label', { for: 'upload-file' }, 'Data file (JSONL, CSV, TSV or text)'), data,
    h('span', { id: 'upload-help', class: 'muted' }, 'The file goes from this browser straight to the storage account (incoming/uploads/) with a short-lived upload address; it never passes through the function app.')),
  h('div', { class: 'form-row' }, h('label', { for: 'upload-spec' }, 'Run spec (optional, JSON: what to run after ingestion)'), spec),
  h('div', { class: 'form-row' }, submit),
  status);
  main.append(h('h1', {}, 'Upload a file to start a run'), form);
  return () => {};
}

window.addEventListener('hashchange', () => { route(); document.getElementById('main').focus(); });
route();
