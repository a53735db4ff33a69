// Browser tests against the release server binary. scripts/test builds it and passes a free
// port and a fresh data directory; run alone, this file picks its own.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { defineConfig, devices } from '@playwright/test';

// Workers load this file again; values chosen here go through the environment they inherit,
// so every process agrees on one port and one data directory.
if (!process.env.E2E_PORT) {
  process.env.E2E_PORT = execFileSync(process.execPath, [
    '-e',
    `const s = require('net').createServer();
     s.listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close(); });`,
  ])
    .toString()
    .trim();
}
if (!process.env.E2E_DATA_DIR) {
  const dir = mkdtempSync(join(tmpdir(), 'leptos-realtime-e2e-'));
  process.env.E2E_DATA_DIR = dir;
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
}

const port = process.env.E2E_PORT;
const baseURL = `http://127.0.0.1:${port}`;
const serverBin = process.env.E2E_SERVER_BIN ?? resolve(__dirname, '../target/release/server');
const siteRoot = process.env.E2E_SITE_ROOT ?? resolve(__dirname, '../target/site');

export default defineConfig({
  testDir: './tests',
  fullyParallel: false,
  workers: 1,
  retries: 0,
  forbidOnly: !!process.env.CI,
  timeout: 60_000,
  expect: { timeout: 10_000 },
  reporter: [['list']],
  outputDir: './test-results',
  use: {
    baseURL,
    trace: 'retain-on-failure',
    actionTimeout: 10_000,
    navigationTimeout: 20_000,
  },
  projects: [
    {
      name: 'chromium',
      use: {
        ...devices['Desktop Chrome'],
        launchOptions: {
          executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium',
          args: [
            '--no-sandbox',
            '--disable-gpu',
            '--disable-background-networking',
            '--disable-component-update',
            '--disable-sync',
            '--no-first-run',
          ],
        },
      },
    },
  ],
  webServer: {
    command: serverBin,
    url: `${baseURL}/`,
    reuseExistingServer: false,
    timeout: 60_000,
    stdout: 'pipe',
    stderr: 'pipe',
    gracefulShutdown: { signal: 'SIGTERM', timeout: 5_000 },
    env: {
      LEPTOS_SITE_ADDR: `127.0.0.1:${port}`,
      LEPTOS_SITE_ROOT: siteRoot,
      LEPTOS_OUTPUT_NAME: 'leptos-realtime',
      LEPTOS_ENV: 'PROD',
      REALTIME_DATA_DIR: process.env.E2E_DATA_DIR,
      RUST_LOG: process.env.RUST_LOG ?? 'info',
    },
  },
});
