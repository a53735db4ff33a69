// Nothing is lost across a reconnect: a network cut in the middle of an answer, and a restart
// of the host process.
import { test, expect, unique, type AppUser } from './fixtures';
import { FlakyLink, Host } from './host';

// A longer answer than the default, so that a test can cut in while it streams.
const SLOW_ANSWER = { REALTIME_AI_ANSWER_WORDS: '80', REALTIME_AI_CHUNK_DELAY_MS: '50' };

let host: Host;
test.beforeEach(async () => {
  host = await Host.start(SLOW_ANSWER);
});
test.afterEach(async () => {
  await host.dispose();
});

async function chunksOf(user: AppUser, prompt: string): Promise<number> {
  return Number(await user.answerFor(prompt).getAttribute('data-chunks'));
}

test('an answer cut off by a network outage arrives whole once back online', async ({
  newUser,
}) => {
  // The page talks to the host through a link the test can cut.
  const link = await FlakyLink.open(host.port);
  try {
    const user = await newUser(link.url);
    await user.signIn(unique('commuter'));
    await user.expectActive();

    const prompt = unique('tell me a long story about offsets');
    const answer = await user.ask(prompt);
    await expect.poll(() => chunksOf(user, prompt)).toBeGreaterThanOrEqual(5);

    link.cut();
    await expect(user.byId('connection-state')).not.toHaveAttribute('data-state', 'active');
    // From here the browser is offline too: its retries fail until the network comes back.
    await user.page.context().setOffline(true);
    const cutAt = await chunksOf(user, prompt);
    // 80 chunks at 50 ms: the answer finishes on the server while the page is offline.
    await user.page.waitForTimeout(5_000);
    expect(await chunksOf(user, prompt), 'chunks that arrived while offline').toBe(cutAt);
    await expect(answer).toHaveAttribute('data-complete', 'false');

    link.restore();
    await user.page.context().setOffline(false);
    const text = await user.expectComplete(answer);
    await user.expectActive();
    await expect(user.byId('recovery-notice')).toHaveCount(0);

    // The same prompt, uninterrupted, is the reference: same text, no chunk missing or doubled.
    await user.byId('ask-input').fill(prompt);
    await user.byId('ask-button').click();
    await expect(user.answerFor(prompt)).toHaveCount(2);
    const referenceText = await user.expectComplete(user.answerFor(prompt).nth(1));
    expect(text).toBe(referenceText);
  } finally {
    await link.close();
  }
});

test('a host restart mid-answer is reported as incomplete recovery, then streaming resumes', async ({
  newUser,
}) => {
  const user = await newUser(host.url);
  const name = unique('restarter');
  await user.signIn(name);
  await user.expectActive();

  const prompt = unique('what happens when the server restarts');
  const answer = await user.ask(prompt);
  await expect.poll(() => chunksOf(user, prompt)).toBeGreaterThanOrEqual(5);

  await host.restart();

  // The new process has a new epoch: the page must not pretend nothing was lost.
  await expect(user.byId('recovery-notice')).toBeVisible({ timeout: 20_000 });
  await expect(user.byId('recovery-notice')).toContainText('epoch_changed');
  await user.expectActive();
  await expect(answer).toHaveAttribute('data-complete', 'false');

  // The session survived the restart, and new answers stream as before.
  await expect(user.byId('user-name')).toHaveText(name);
  const after = unique('and after the restart');
  await user.expectComplete(await user.ask(after));
});

test('a page reloaded mid-answer gets the whole answer back from history', async ({ newUser }) => {
  const user = await newUser(host.url);
  await user.signIn(unique('reloader'));
  await user.expectActive();
  const earlier = unique('asked before the reload');
  const earlierText = await user.expectComplete(await user.ask(earlier));
  const prompt = unique('reload while this streams');
  await user.ask(prompt);
  await expect.poll(() => chunksOf(user, prompt)).toBeGreaterThanOrEqual(5);

  await user.open('ask-button');
  await user.expectActive();
  // The reloaded tab asks for its channel's history again: both answers are whole, the one
  // that was streaming included, and nothing is reported missing.
  await expect(user.byId('answer')).toHaveCount(2);
  expect(await user.expectComplete(user.answerFor(earlier))).toBe(earlierText);
  await user.expectComplete(user.answerFor(prompt));
  await expect(user.byId('recovery-notice')).toHaveCount(0);
  expect(user.problems).toEqual([]);
});

test('a new tab that joins mid-answer says the answer is partial instead of passing it off as whole', async ({
  newUser,
}) => {
  const user = await newUser(host.url);
  await user.signIn(unique('joiner'));
  await user.expectActive();
  const prompt = unique('open another tab while this streams');
  await user.ask(prompt);
  await expect.poll(() => chunksOf(user, prompt)).toBeGreaterThanOrEqual(5);

  // A new tab has no history of its own to ask for: it starts live, mid-stream.
  const tab = await user.newTab();
  await tab.open('ask-button');
  await tab.expectActive();
  const partial = tab.byId('answer').first();
  await expect(partial).toHaveAttribute('data-expected-chunks', /\d+/, { timeout: 20_000 });
  await expect(partial).toHaveAttribute('data-complete', 'false');
  await expect(partial.getByTestId('answer-gap')).toContainText('Part of this answer was missed');
});
