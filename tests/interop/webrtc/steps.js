// Step bookkeeping shared by the WebRTC interop drivers (jssip_node.js, browser_call.js): each
// step prints one `PASS <scenario>: <step>` or `FAIL <scenario>: <step>: <reason>` line, and
// waits only on events, each bounded by a deadline.
'use strict';

class Steps {
  constructor(scenario) {
    this.scenario = scenario;
    this.failed = 0;
  }

  /** Runs `body` (async) as one step; a throw or a timeout inside makes it FAIL and is rethrown. */
  async step(name, body) {
    const t0 = Date.now();
    try {
      const detail = await body();
      const took = ((Date.now() - t0) / 1000).toFixed(2);
      console.log(`PASS ${this.scenario}: ${name}${detail ? ` (${detail})` : ''} [${took}s]`);
      return detail;
    } catch (error) {
      this.failed += 1;
      console.log(
        `FAIL ${this.scenario}: ${name}: ${error && error.message ? error.message : error}`,
      );
      throw error;
    }
  }
}

/** Resolves with the promise's value, or rejects after `ms` saying what was awaited. */
function within(ms, what, promise) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`timed out after ${ms / 1000}s waiting for ${what}`)),
      ms,
    );
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/** The first `event` of `emitter` (a JsSIP UA or RTCSession), rejected by any of `failures`. */
function once(emitter, event, failures = []) {
  return new Promise((resolve, reject) => {
    const done = () => {
      emitter.removeListener(event, ok);
      for (const f of failures) emitter.removeListener(f, ko[f]);
    };
    const ok = (e) => {
      done();
      resolve(e);
    };
    const ko = {};
    for (const f of failures) {
      ko[f] = (e) => {
        done();
        const why =
          e && (e.cause || (e.response && `${e.response.status_code} ${e.response.reason_phrase}`));
        reject(new Error(`${f}${why ? `: ${why}` : ''}`));
      };
      emitter.on(f, ko[f]);
    }
    emitter.on(event, ok);
  });
}

/** The value of the `--name value` argument, or `fallback`. */
function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (fallback === undefined) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
  return fallback;
}

module.exports = { Steps, within, once, arg };
