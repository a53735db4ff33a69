// A host process of the test's own, for tests that restart it or need other settings than the
// shared `webServer` (a short token lifetime, a short session). Listens on 127.0.0.1 only.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const serverBin = process.env.E2E_SERVER_BIN ?? resolve(__dirname, '../../target/release/server');
const siteRoot = process.env.E2E_SITE_ROOT ?? resolve(__dirname, '../../target/site');

async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => done(port));
    });
  });
}

export class Host {
  private child?: ChildProcess;
  readonly log: string[] = [];

  private constructor(
    readonly port: number,
    readonly dataDir: string,
    private readonly env: Record<string, string>,
  ) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /// Starts a host with `env` on top of the defaults and waits until it answers.
  static async start(env: Record<string, string> = {}): Promise<Host> {
    const dataDir = mkdtempSync(join(tmpdir(), 'leptos-realtime-host-'));
    const host = new Host(await freePort(), dataDir, env);
    await host.launch();
    return host;
  }

  private async launch(): Promise<void> {
    const child = spawn(serverBin, [], {
      env: {
        ...process.env,
        LEPTOS_SITE_ADDR: `127.0.0.1:${this.port}`,
        LEPTOS_SITE_ROOT: siteRoot,
        LEPTOS_OUTPUT_NAME: 'leptos-realtime',
        LEPTOS_ENV: 'PROD',
        REALTIME_DATA_DIR: this.dataDir,
        RUST_LOG: 'info',
        ...this.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    for (const stream of [child.stdout, child.stderr]) {
      stream?.on('data', (chunk: Buffer) => this.log.push(chunk.toString()));
    }
    this.child = child;
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (child.exitCode !== null) {
        throw new Error(`host exited with ${child.exitCode}:\n${this.log.join('')}`);
      }
      try {
        const res = await fetch(`${this.url}/healthz`);
        if (res.ok) return;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`host did not answer within 30 s:\n${this.log.join('')}`);
  }

  /// Stops the process the way an operator does (SIGTERM) and waits for it to exit.
  async stop(): Promise<number | null> {
    const child = this.child;
    if (!child || child.exitCode !== null) return child?.exitCode ?? null;
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    const code = await exited;
    clearTimeout(timer);
    return code;
  }

  /// Stops and starts again on the same port and data directory.
  async restart(): Promise<void> {
    const code = await this.stop();
    if (code !== 0) throw new Error(`host exited with ${code} on SIGTERM:\n${this.log.join('')}`);
    await this.launch();
  }

  async dispose(): Promise<void> {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/// A `redis-server` of the test's own on a free loopback port, saving nothing to disk, for
/// hosts that share their broker (`REALTIME_REDIS_URL`).
export class Redis {
  private constructor(
    private readonly child: ChildProcess,
    readonly port: number,
  ) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}/`;
  }

  static async start(): Promise<Redis> {
    const port = await freePort();
    const args = ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
    const child = spawn('redis-server', args, { stdio: 'ignore' });
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
      const up = await new Promise<boolean>((done) => {
        const probe = createConnection({ host: '127.0.0.1', port }, () => {
          probe.destroy();
          done(true);
        });
        probe.on('error', () => done(false));
      });
      if (up) return new Redis(child, port);
      await new Promise((r) => setTimeout(r, 50));
    }
    child.kill('SIGKILL');
    throw new Error('redis-server did not listen within 10 s (scripts/setup test installs it)');
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGTERM');
    await exited;
  }
}

/// A TCP hop between the browser and a host that a test can cut, like a network outage:
/// `cut()` drops every open connection (the browser sees its WebSocket die without a close
/// frame) and refuses new ones until `restore()`. Playwright's `setOffline` alone does not
/// touch WebSockets that are already open.
export class FlakyLink {
  private sockets = new Set<Socket>();
  private down = false;

  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  static async open(targetPort: number): Promise<FlakyLink> {
    const port = await freePort();
    let link: FlakyLink | undefined;
    const server = createServer((client) => {
      if (!link || link.down) {
        client.destroy();
        return;
      }
      const upstream = createConnection({ host: '127.0.0.1', port: targetPort });
      for (const [a, b] of [
        [client, upstream],
        [upstream, client],
      ] as const) {
        a.pipe(b);
        a.on('error', () => b.destroy());
        a.on('close', () => b.destroy());
        link.sockets.add(a);
        a.on('close', () => link?.sockets.delete(a));
      }
    });
    await new Promise<void>((r) => server.listen(port, '127.0.0.1', () => r()));
    link = new FlakyLink(server, port);
    return link;
  }

  cut(): void {
    this.down = true;
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  restore(): void {
    this.down = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise((r) => this.server.close(() => r(undefined)));
  }
}
