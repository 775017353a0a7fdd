// A small scripted browser: fetch with manual redirects, a cookie jar, and form submission for
// the pages the two servers show (IAM's login, consent and device pages; Rails' login and
// Doorkeeper's consent page). It stops when a redirect leaves for the client's redirect_uri.

export class Browser {
  constructor({ username = 'alice', log = () => {} } = {}) {
    this.username = username;
    this.cookies = []; // { name, value, host, path }
    this.history = []; // { method, url, status, location? }
    this.log = log;
  }

  // RFC 6265: cookies are scoped by host and path, not by port, as in a real browser.
  cookieHeader(url) {
    const now = Date.now();
    this.cookies = this.cookies.filter((c) => !c.expires || c.expires > now);
    return this.cookies
      .filter((c) => c.host === url.hostname && pathMatches(url.pathname, c.path))
      .sort((a, b) => b.path.length - a.path.length)
      .map((c) => `${c.name}=${c.value}`)
      .join('; ');
  }

  storeCookies(url, res) {
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...attrs] = line.split(';').map((s) => s.trim());
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq);
      const value = pair.slice(eq + 1);
      let cookiePath = defaultPath(url.pathname);
      let expires = null;
      for (const attr of attrs) {
        const [k, v = ''] = attr.split('=');
        const key = k.toLowerCase();
        if (key === 'path' && v.startsWith('/')) cookiePath = v;
        if (key === 'max-age') expires = Date.now() + Number(v) * 1000;
        if (key === 'expires' && expires === null) expires = Date.parse(v);
      }
      this.cookies = this.cookies.filter((c) => !(c.name === name && c.host === url.hostname && c.path === cookiePath));
      if (expires === null || expires > Date.now()) {
        this.cookies.push({ name, value, host: url.hostname, path: cookiePath, expires });
      }
    }
  }

  async request(method, href, form) {
    const url = new URL(href);
    const headers = { accept: 'text/html,application/json;q=0.9' };
    const cookie = this.cookieHeader(url);
    if (cookie) headers.cookie = cookie;
    let body;
    if (form) {
      headers['content-type'] = 'application/x-www-form-urlencoded';
      body = new URLSearchParams(form).toString();
    }
    const res = await fetch(url, { method, headers, body, redirect: 'manual' });
    this.storeCookies(url, res);
    const text = await res.text();
    const location = res.headers.get('location');
    const entry = { method, url: redact(url.href), status: res.status };
    if (location) entry.location = redact(new URL(location, url).href);
    this.history.push(entry);
    this.log(entry);
    return { status: res.status, url, location: location && new URL(location, url).href, text };
  }

  /**
   * Runs a browser flow from `start` until a redirect leaves for `redirectUri` (returns that
   * URL) or, with no redirectUri, until a page says the flow is done (device success page).
   */
  async run(start, { redirectUri, maxSteps = 25 } = {}) {
    let method = 'GET';
    let href = start;
    let form;
    let lastAuthorize = null; // where to come back to after Rails' login
    for (let step = 0; step < maxSteps; step += 1) {
      if (redirectUri && href.startsWith(redirectUri)) return href;
      const url = new URL(href);
      if (url.pathname.endsWith('/oauth/authorize') && method === 'GET') lastAuthorize = href;

      // Rails' scripted login: POST /test/login username=<name> sets the session.
      if (method === 'GET' && url.pathname === '/test/login') {
        const res = await this.request('POST', new URL('/test/login', url).href, { username: this.username });
        if (res.status >= 400) throw flowError(`Rails login answered ${res.status}`, this, res);
        if (res.location) {
          href = res.location;
        } else if (lastAuthorize) {
          href = lastAuthorize;
        } else {
          throw flowError('Rails login did not say where to go', this, res);
        }
        method = 'GET';
        form = undefined;
        continue;
      }

      const res = await this.request(method, href, form);
      if (res.status >= 300 && res.status < 400 && res.location) {
        href = res.location;
        method = 'GET';
        form = undefined;
        continue;
      }
      if (res.status !== 200) throw flowError(`${method} ${url.pathname} answered ${res.status}`, this, res);
      if (!redirectUri && /id="device-success"/.test(res.text)) return res.url.href;

      const next = this.nextForm(res.text, res.url, lastAuthorize);
      if (!next) throw flowError(`no form to submit on ${url.pathname}`, this, res);
      ({ href, form } = next);
      method = 'POST';
    }
    throw flowError(`flow did not finish within ${maxSteps} steps`, this);
  }

  nextForm(html, pageUrl, lastAuthorize) {
    const forms = parseForms(html);
    const byId = (id) => forms.find((f) => f.id === id);
    const action = (f) => new URL(f.action || pageUrl.href, pageUrl).href;

    const login = byId('login');
    if (login) return { href: action(login), form: { ...login.fields, username: this.username } };
    const consent = byId('consent') ?? byId('op.deviceConfirmForm');
    if (consent) return { href: action(consent), form: consent.fields };
    if (byId('op.deviceInputForm')) return null; // would need the user code typed in

    // Doorkeeper's consent page: the "Authorize" form posts to /oauth/authorize; the "Deny"
    // form carries _method=delete. The contract's fields default to the authorization
    // request's own parameters when the page leaves one out.
    const approve = forms.find((f) => f.method === 'post'
      && new URL(action(f)).pathname.endsWith('/oauth/authorize')
      && (f.fields._method ?? 'post').toLowerCase() === 'post');
    if (approve) {
      const fields = { ...approve.fields };
      if (lastAuthorize) {
        const q = new URL(lastAuthorize).searchParams;
        for (const k of ['client_id', 'redirect_uri', 'state', 'response_type', 'scope', 'code_challenge', 'code_challenge_method']) {
          if (fields[k] === undefined && q.has(k)) fields[k] = q.get(k);
        }
      }
      return { href: action(approve), form: fields };
    }
    // oidc-provider's auto-submitting form_post page (e.g. /oauth/device?user_code=...).
    const auto = forms.find((f) => f.method === 'post' && /document\.forms\[0\]\.submit\(\)/.test(html));
    if (auto) return { href: action(auto), form: auto.fields };
    return null;
  }
}

function parseForms(html) {
  const forms = [];
  const formRe = /<form\b([^>]*)>([\s\S]*?)<\/form>/gi;
  for (const m of html.matchAll(formRe)) {
    const attrs = parseAttrs(m[1]);
    const fields = {};
    for (const i of m[2].matchAll(/<input\b([^>]*)>/gi)) {
      const a = parseAttrs(i[1]);
      if (a.name && (a.type ?? 'text').toLowerCase() !== 'submit') fields[a.name] = a.value ?? '';
    }
    for (const b of m[2].matchAll(/<button\b([^>]*)>/gi)) {
      const a = parseAttrs(b[1]);
      if (a.name && a.value !== undefined && fields[a.name] === undefined) fields[a.name] = a.value;
    }
    forms.push({ id: attrs.id, action: attrs.action, method: (attrs.method ?? 'get').toLowerCase(), fields });
  }
  return forms;
}

function parseAttrs(s) {
  const attrs = {};
  for (const m of s.matchAll(/([a-zA-Z_:][-a-zA-Z0-9_:.]*)\s*(?:=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?/g)) {
    attrs[m[1].toLowerCase()] = decodeEntities(m[2] ?? m[3] ?? m[4] ?? '');
  }
  return attrs;
}

function decodeEntities(s) {
  return s
    .replace(/&#(\d+);/g, (_, n) => String.fromCharCode(Number(n)))
    .replace(/&#x([0-9a-f]+);/gi, (_, n) => String.fromCharCode(parseInt(n, 16)))
    .replace(/&quot;/g, '"').replace(/&#39;/g, "'").replace(/&lt;/g, '<').replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

function pathMatches(requestPath, cookiePath) {
  if (requestPath === cookiePath) return true;
  if (!requestPath.startsWith(cookiePath)) return false;
  return cookiePath.endsWith('/') || requestPath[cookiePath.length] === '/';
}

function defaultPath(p) {
  const i = p.lastIndexOf('/');
  return i <= 0 ? '/' : p.slice(0, i);
}

// Codes and verifiers stay out of assertion messages.
function redact(href) {
  const url = new URL(href);
  for (const k of ['code', 'code_verifier', 'user_code']) {
    if (url.searchParams.has(k)) url.searchParams.set(k, `${url.searchParams.get(k).slice(0, 9)}…`);
  }
  return url.href;
}

function flowError(message, browser, res) {
  const tail = res?.text ? `\n--- page ---\n${res.text.slice(0, 1500)}` : '';
  return new Error(`${message}\n--- browser history ---\n${browser.history.map((h) => JSON.stringify(h)).join('\n')}${tail}`);
}
