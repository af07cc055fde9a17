// The API client: every data route is /api/...; in Azure they take the function key, which the page
// was opened with as ?code= and keeps for this browser tab (sessionStorage), sent as x-functions-key.
const keyName = 'pipeline.functionKey';
const fromUrl = new URLSearchParams(location.search).get('code');
if (fromUrl) {
  sessionStorage.setItem(keyName, fromUrl);
}
const key = sessionStorage.getItem(keyName);

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function send(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (key) {
    headers.set('x-functions-key', key);
  }
  const response = await fetch(path, { ...init, headers });
  if (!response.ok) {
    let problem = null;
    try { problem = await response.json(); } catch { /* not a problem document */ }
    throw new ApiError(response.status, problem);
  }
  return response;
}

export const getJson = async (path) => (await send(path)).json();
export const getText = async (path) => (await send(path)).text();
export const postJson = async (path, body) =>
  (await send(path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) })).json();

/** The API path of an artifact ("container/path"). */
export const artifactPath = (ref) => `/api/artifacts/${ref.split('/').map(encodeURIComponent).join('/')}`;

/** A link that downloads an artifact (links carry no headers, so the key goes in the query). */
export const downloadUrl = (ref) => `${artifactPath(ref)}?download=1${key ? `&code=${encodeURIComponent(key)}` : ''}`;

/** The blobs of a folder artifact ("container/folder/"), or [] when it has none yet. */
export const listFolder = (ref) => getJson(artifactPath(ref.endsWith('/') ? ref : `${ref}/`));

/** The first lines of a text artifact. */
export const firstLines = async (ref, lines) => (await getText(`${artifactPath(ref)}?lines=${lines}`)).split('\n').filter((l) => l.length > 0);

/** Splits a file into blocks and writes them with the SAS URL (Put Block, then Put Block List), so any size passes. */
export async function uploadToBlob(url, file, onProgress) {
  const blockSize = 4 * 1024 * 1024;
  const ids = [];
  for (let offset = 0, n = 0; offset < file.size || n === 0; offset += blockSize, n++) {
    const id = btoa(String(n).padStart(6, '0'));
    ids.push(id);
    const block = await fetch(`${url}&comp=block&blockid=${encodeURIComponent(id)}`, { method: 'PUT', body: file.slice(offset, offset + blockSize) });
    if (!block.ok) {
      throw new Error(`Writing block ${n} to storage failed: HTTP ${block.status}`);
    }
    onProgress?.(Math.min(file.size, offset + blockSize), file.size);
  }
  const list = `<?xml version="1.0" encoding="utf-8"?><BlockList>${ids.map((id) => `<Latest>${id}</Latest>`).join('')}</BlockList>`;
  const commit = await fetch(`${url}&comp=blocklist`, { method: 'PUT', headers: { 'x-ms-blob-content-type': file.type || 'application/octet-stream' }, body: list });
  if (!commit.ok) {
    throw new Error(`Committing the upload failed: HTTP ${commit.status}`);
  }
}
