// The token for the whole life of a connection: in-band refresh, sign-out and session expiry.
import { test, expect, unique, AppUser } from './fixtures';
import { Host } from './host';

let host: Host | undefined;
test.afterEach(async ({}, testInfo) => {
  if (host && testInfo.status !== testInfo.expectedStatus) {
    await testInfo.attach('host.log', { body: host.log.join('') });
    console.log(host.log.join(''));
  }
  await host?.dispose();
  host = undefined;
});

test('a connection outlives many short tokens by refreshing in-band', async ({ newUser }) => {
  host = await Host.start({ REALTIME_TOKEN_TTL_SECS: '3' });
  const user = await newUser(host.url);
  const sockets: string[] = [];
  const states = new Set<string>();
  let tokens = 0;
  user.page.on('websocket', (ws) => sockets.push(ws.url()));
  user.page.on('request', (req) => {
    if (req.url().includes('/api/subscription_token')) tokens += 1;
  });
  await user.signIn(unique('long-lived'));
  await user.expectActive();
  const socketsAtStart = sockets.length;

  const watch = setInterval(async () => {
    const s = await user.byId('connection-state').getAttribute('data-state').catch(() => null);
    if (s) states.add(s);
  }, 100);
  await user.page.waitForTimeout(10_000);
  clearInterval(watch);

  expect(tokens, 'fresh tokens fetched over 10 s of 3 s tokens').toBeGreaterThanOrEqual(3);
  expect(sockets.length, 'no reconnect was needed').toBe(socketsAtStart);
  expect([...states].filter((s) => s !== 'active' && s !== 'refreshing')).toEqual([]);
  await expect(user.byId('realtime-error')).toHaveCount(0);
  await user.expectComplete(await user.ask(unique('still streaming')));
});

test('signing out in one tab closes the live socket of another tab at once', async ({
  newUser,
}) => {
  host = await Host.start();
  const first = await newUser(host.url);
  await first.signIn(unique('two-tabs'));
  await first.expectActive();
  const second = await first.newTab();
  await second.open('sign-out-button');
  await second.expectActive();

  await first.byId('sign-out-button').click();
  await expect(first.byId('sign-in-form')).toBeVisible();
  // The other tab's socket is closed by the server (4003), and the tab says why.
  await expect(second.byId('session-notice')).toContainText('4003', { timeout: 2_000 });
  await expect(second.byId('session-notice')).toContainText('signed out');
  await expect(second.byId('sign-in-form')).toBeVisible();
});

test('an expired session closes its socket', async ({ newUser }) => {
  host = await Host.start({ REALTIME_SESSION_TTL_SECS: '3' });
  const user = await newUser(host.url);
  await user.signIn(unique('idle'));
  await user.expectActive();
  await expect(user.byId('session-notice')).toContainText('4003', { timeout: 10_000 });
  await expect(user.byId('session-notice')).toContainText('session expired');
  await expect(user.byId('sign-in-form')).toBeVisible();
});
