// The HTTP client: every request of the page goes through send(), which adds the user's name and,
// when the server gave one, the access token (Authorization: Bearer). The token arrives once in the
// page's address as #token=..., is kept in sessionStorage and removed from the visible URL.
// URLs that elements load themselves (<img src>, downloads) carry it as ?token= instead: withToken().

const TOKEN_KEY = "segany.token";

function readToken() {
  const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
  const fromHash = hash.get("token");
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, fromHash);
    hash.delete("token");
    const rest = hash.toString();
    history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

const token = readToken();
let user = localStorage.getItem("segany.user") || "annotator";

export function getUser() { return user; }
export function setUser(name) { user = name.trim() || "annotator"; localStorage.setItem("segany.user", user); return user; }

export function withToken(url) {
  if (!token) return url;
  const u = new URL(url, location.href);
  u.searchParams.set("token", token);
  return u.pathname + u.search;
}

async function errorOf(res) {
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : res.statusText;
  const err = new Error(`${res.status}: ${detail}`);
  err.status = res.status;
  return err;
}

// The one place the page calls fetch(). Returns the Response (ok), or throws Error with .status.
export async function send(method, path, { body, form, headers, signal } = {}) {
  const opts = { method, headers: { "X-User": user, ...(headers || {}) }, signal };
  if (token) opts.headers.Authorization = `Bearer ${token}`;
  if (form !== undefined) opts.body = form;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, opts);
  if (!res.ok) throw await errorOf(res);
  return res;
}

// JSON in, JSON out.
export async function api(method, path, body, isForm) {
  const res = await send(method, path, isForm ? { form: body } : { body });
  const text = await res.text();
  try { return text ? JSON.parse(text) : null; } catch (e) { return text; }
}

// Bytes of a file, from the page's own cache when it holds `cacheKey` (Cache Storage survives reloads
// and works offline), else from the server (then kept). Returns { bytes, fromCache }.
const CACHE_NAME = "segany-v1";
export async function cachedBytes(path, cacheKey) {
  const cache = typeof caches !== "undefined" ? await caches.open(CACHE_NAME).catch(() => null) : null;
  const key = new URL(`/__segany_cache__/${cacheKey}`, location.href).href;
  if (cache) {
    const hit = await cache.match(key);
    if (hit) return { bytes: new Uint8Array(await hit.arrayBuffer()), fromCache: true };
  }
  const res = await send("GET", path);
  const bytes = new Uint8Array(await res.arrayBuffer());
  if (cache) await cache.put(key, new Response(bytes, { headers: { "Content-Type": "application/octet-stream" } })).catch(() => {});
  return { bytes, fromCache: false };
}
