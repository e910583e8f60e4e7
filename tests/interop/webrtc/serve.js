// Serves the web phone (phone.html, phone.js and JsSIP bundled for the browser) on 127.0.0.1.
//
//   node serve.js [--port 8444] [--cert CERT.pem --key KEY.pem]
//
// Over HTTPS with --cert/--key, else over plain HTTP (http://127.0.0.1 is a secure context:
// a browser grants it the microphone and WebRTC like an https page). Only those three files
// are served, to 127.0.0.1 only. JsSIP's npm package carries no browser bundle (from 3.13):
// it is built at start with esbuild from the installed package (npm ci in this directory, or
// NODE_PATH naming the node_modules of a temporary install). Used by docs/webphone.md's browser
// phone block and by browser_call.js (.ci/interop browser).
'use strict';

const fs = require('fs');
const http = require('http');
const https = require('https');
const path = require('path');

/** JsSIP as one browser script defining the global `JsSIP`. */
function jssipBundle() {
  const esbuild = require('esbuild');
  const entry = require.resolve('jssip');
  const result = esbuild.buildSync({
    entryPoints: [entry],
    bundle: true,
    format: 'iife',
    globalName: 'JsSIP',
    platform: 'browser',
    minify: true,
    write: false,
    logLevel: 'silent',
  });
  return Buffer.from(result.outputFiles[0].contents);
}

/** Starts the page server; resolves with { server, url }. */
function servePhone({ port = 8444, cert = '', key = '' } = {}) {
  const files = {
    '/': {
      type: 'text/html; charset=utf-8',
      body: fs.readFileSync(path.join(__dirname, 'phone.html')),
    },
    '/phone.js': {
      type: 'text/javascript; charset=utf-8',
      body: fs.readFileSync(path.join(__dirname, 'phone.js')),
    },
    '/jssip.js': { type: 'text/javascript; charset=utf-8', body: jssipBundle() },
  };
  const handler = (req, res) => {
    const file = files[new URL(req.url, 'http://x').pathname.replace(/^\/phone\.html$/, '/')];
    if (!file || req.method !== 'GET') {
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found\n');
      return;
    }
    res.writeHead(200, { 'Content-Type': file.type, 'Cache-Control': 'no-store' }).end(file.body);
  };
  const secure = Boolean(cert && key);
  const server = secure
    ? https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, handler)
    : http.createServer(handler);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(port), '127.0.0.1', () => {
      resolve({
        server,
        url: `${secure ? 'https' : 'http'}://127.0.0.1:${server.address().port}/`,
      });
    });
  });
}

module.exports = { servePhone };

if (require.main === module) {
  const { arg } = require('./steps');
  servePhone({ port: arg('port', '8444'), cert: arg('cert', ''), key: arg('key', '') })
    .then(({ url }) => console.log(`the web phone is at ${url} (Ctrl-C stops)`))
    .catch((error) => {
      console.error(`cannot serve the web phone: ${error.message}`);
      process.exit(1);
    });
}
