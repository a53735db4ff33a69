// Shared pieces of the browser tests: a `newUser` fixture that opens a fresh browser context
// per user, and `AppUser`, which drives the page the way a person would.
import { test as base, expect, type Browser, type Locator, type Page } from '@playwright/test';

/// Longest display name the server accepts (app/src/api.rs, MAX_NAME_CHARS).
export const MAX_NAME_CHARS = 40;

/// Answers stream one chunk every ~40 ms; this leaves room for a slow, shared machine.
const ANSWER_TIMEOUT = 30_000;

let counter = 0;
/// A value no other test or run uses, so a leaked message cannot be mistaken for one's own.
export function unique(prefix: string): string {
  counter += 1;
  return `${prefix}-${counter}-${Math.random().toString(36).slice(2, 8)}`;
}

// Hydration attaches the event listeners to server-rendered elements; until then a click
// does nothing. This probe marks each element that gets a listener, so a test can wait for
// the element it is about to use rather than for a fixed time.
const LISTENER_PROBE = `(() => {
  const add = EventTarget.prototype.addEventListener;
  EventTarget.prototype.addEventListener = function (...args) {
    if (this instanceof Element) this.__e2eListeners = (this.__e2eListeners || 0) + 1;
    return add.apply(this, args);
  };
})();`;

export class AppUser {
  /// Console errors and warnings, and uncaught page errors, in the order they happened.
  readonly problems: string[] = [];

  constructor(readonly page: Page) {
    page.on('console', (msg) => {
      if (msg.type() === 'error' || msg.type() === 'warning') {
        this.problems.push(`console.${msg.type()}: ${msg.text()}`);
      }
    });
    page.on('pageerror', (err) => this.problems.push(`pageerror: ${err.message}`));
  }

  /// Another tab of the same browser: same cookies, but its own session storage.
  async newTab(): Promise<AppUser> {
    return new AppUser(await this.page.context().newPage());
  }

  byId(testId: string): Locator {
    return this.page.getByTestId(testId);
  }

  /// Loads the page (of another host when `url` says so) and waits until `testId` (or the
  /// form around it) is hydrated.
  async open(testId = 'sign-in-button', url = '/'): Promise<void> {
    await this.page.goto(url);
    await this.waitInteractive(testId);
  }

  async waitInteractive(testId: string): Promise<void> {
    try {
      await this.page.waitForFunction((id) => {
        const el = document.querySelector(`[data-testid="${id}"]`);
        if (!el) return false;
        const scope = el.closest('form') ?? el;
        const nodes = [scope, ...Array.from(scope.querySelectorAll('*'))];
        return nodes.some((node) => ((node as any).__e2eListeners ?? 0) > 0);
      }, testId);
    } catch (err) {
      const seen = this.problems.length ? this.problems.join('\n  ') : 'none';
      const why = `${testId} never became interactive (did hydration fail?)`;
      throw new Error(`${why}\nconsole problems so far:\n  ${seen}\n${err}`);
    }
  }

  /// Submits the sign-in form as it stands, without checking the outcome.
  async submitName(name: string): Promise<void> {
    await this.byId('name-input').fill(name);
    await this.byId('sign-in-button').click();
  }

  /// Opens the page, signs in as `name` and waits until the page shows the user.
  async signIn(name: string): Promise<void> {
    await this.open();
    await this.submitName(name);
    await expect(this.byId('user-name')).toHaveText(name);
  }

  async expectActive(): Promise<void> {
    await expect(this.byId('connection-state')).toHaveAttribute('data-state', 'active');
  }

  /// How many live messages the page has received, as it shows them.
  async messageCount(): Promise<number> {
    const text = (await this.byId('message-count').textContent()) ?? '';
    const count = Number(text.trim());
    expect(Number.isInteger(count), `message-count shows a number, not "${text}"`).toBe(true);
    return count;
  }

  /// The answer card for `prompt`; prompts are unique per test.
  answerFor(prompt: string): Locator {
    return this.byId('answer').filter({
      has: this.page.getByTestId('answer-prompt').getByText(prompt, { exact: true }),
    });
  }

  /// Asks `prompt` and returns its answer card once the page shows it.
  async ask(prompt: string): Promise<Locator> {
    await this.waitInteractive('ask-button');
    await this.byId('ask-input').fill(prompt);
    await this.byId('ask-button').click();
    const answer = this.answerFor(prompt);
    await expect(answer).toHaveCount(1);
    return answer;
  }

  /// Waits for `answer` to finish and checks that nothing went missing; returns its text.
  async expectComplete(answer: Locator): Promise<string> {
    await expect(answer).toHaveAttribute('data-complete', 'true', { timeout: ANSWER_TIMEOUT });
    const expected = Number(await answer.getAttribute('data-expected-chunks'));
    expect(expected, 'data-expected-chunks of a finished answer').toBeGreaterThan(0);
    await expect(answer).toHaveAttribute('data-chunks', String(expected));
    const text = answer.getByTestId('answer-text');
    await expect(text).toHaveText(/\S/);
    return (await text.textContent()) ?? '';
  }

  /// Records every answer's progress from now on, for `samples` to read back.
  async recordAnswers(): Promise<void> {
    await this.page.evaluate(() => {
      const w = window as any;
      w.__e2eSamples = [];
      const record = () => {
        for (const a of Array.from(document.querySelectorAll('[data-testid="answer"]'))) {
          w.__e2eSamples.push({
            runId: a.getAttribute('data-run-id'),
            chunks: Number(a.getAttribute('data-chunks')),
            complete: a.getAttribute('data-complete'),
            textLength: a.querySelector('[data-testid="answer-text"]')?.textContent?.length ?? 0,
            at: performance.now(),
          });
        }
      };
      new MutationObserver(record).observe(document.body, {
        subtree: true,
        childList: true,
        attributes: true,
        characterData: true,
      });
    });
  }

  /// What `recordAnswers` saw; fails if the page was reloaded since, which loses them.
  async samples(): Promise<AnswerSample[]> {
    const samples = await this.page.evaluate(() => (window as any).__e2eSamples);
    expect(samples, 'answer samples (none means the page reloaded)').toBeDefined();
    return samples;
  }
}

export interface AnswerSample {
  runId: string | null;
  chunks: number;
  complete: string | null;
  textLength: number;
  at: number;
}

async function openUser(
  browser: Browser,
  baseURL: string | undefined,
  contexts: Array<{ close(): Promise<void> }>,
): Promise<AppUser> {
  const context = await browser.newContext({ baseURL });
  contexts.push(context);
  await context.addInitScript(LISTENER_PROBE);
  return new AppUser(await context.newPage());
}

/// `newUser()` opens a user on the shared host; `newUser(url)` on a host a test started itself.
export const test = base.extend<{ newUser: (url?: string) => Promise<AppUser> }>({
  newUser: async ({ browser, baseURL }, use) => {
    const contexts: Array<{ close(): Promise<void> }> = [];
    await use((url?: string) => openUser(browser, url ?? baseURL, contexts));
    for (const context of contexts) await context.close();
  },
});

export { expect };
