// Two hosts sharing one broker through Redis, as a user sees them: one session on both, an
// answer asked on one host streaming to a tab on the other, sign-out on one closing the other's
// socket, and history that outlives a host restart.
import { randomBytes } from 'node:crypto';
import { test, expect, unique } from './fixtures';
import { Host, Redis } from './host';

let redis: Redis;
let hosts: Host[] = [];

test.beforeEach(async () => {
  redis = await Redis.start();
  // Hosts sharing a broker share the token secret too.
  const shared = {
    REALTIME_REDIS_URL: redis.url,
    REALTIME_TOKEN_SECRET: randomBytes(32).toString('hex'),
  };
  hosts = [await Host.start(shared), await Host.start(shared)];
});
test.afterEach(async () => {
  for (const host of hosts) await host.dispose();
  await redis.stop();
});

test('one session on two hosts: an answer asked on one streams to a tab on the other', async ({
  newUser,
}) => {
  const [a, b] = hosts;
  const onA = await newUser(a.url);
  const name = unique('two-hosts');
  await onA.signIn(name);
  await onA.expectActive();

  // Same browser, other host: the session is already there.
  const onB = await onA.newTab();
  await onB.open('ask-button', `${b.url}/`);
  await expect(onB.byId('user-name')).toHaveText(name);
  await onB.expectActive();

  const prompt = unique('asked on the second host');
  const textOnB = await onB.expectComplete(await onB.ask(prompt));
  const textOnA = await onA.expectComplete(onA.answerFor(prompt));
  expect(textOnA).toBe(textOnB);

  // Signing out on B closes A's socket at once, with the session-ended code.
  await onB.byId('sign-out-button').click();
  await expect(onB.byId('sign-in-form')).toBeVisible();
  await expect(onA.byId('session-notice')).toContainText('4003', { timeout: 2_000 });
  await expect(onA.byId('sign-in-form')).toBeVisible();
  expect([...onA.problems, ...onB.problems]).toEqual([]);
});

test('with a shared broker, a host restart loses no history', async ({ newUser }) => {
  const [a] = hosts;
  const user = await newUser(a.url);
  await user.signIn(unique('restart-shared'));
  await user.expectActive();
  const prompt = unique('kept in redis');
  const before = await user.expectComplete(await user.ask(prompt));

  await a.restart();
  await user.expectActive();
  // The channel's epoch lives in Redis: the page resumed with nothing missing.
  await expect(user.byId('recovery-notice')).toHaveCount(0);
  const after = unique('after the restart');
  await user.expectComplete(await user.ask(after));

  // A reload after the restart gets both answers back from the history in Redis.
  await user.open('ask-button');
  await user.expectActive();
  await expect(user.byId('answer')).toHaveCount(2);
  expect(await user.expectComplete(user.answerFor(prompt))).toBe(before);
  await expect(user.byId('recovery-notice')).toHaveCount(0);
});
