// Signing in with a display name, and signing out again.
import { test, expect, unique, MAX_NAME_CHARS } from './fixtures';

test('an empty or over-long name is refused with a message', async ({ newUser }) => {
  const user = await newUser();
  await user.open();
  const error = user.byId('sign-in-error');

  for (const blank of ['', '   ']) {
    await user.submitName(blank);
    await expect(error).toBeVisible();
    await expect(error).toHaveText(/\S/);
    await expect(error).not.toContainText(String(MAX_NAME_CHARS));
    await expect(user.byId('user-name')).toHaveCount(0);
  }

  await user.submitName('x'.repeat(MAX_NAME_CHARS + 1));
  await expect(error).toContainText(String(MAX_NAME_CHARS));
  await expect(user.byId('user-name')).toHaveCount(0);
  await expect(user.byId('sign-in-form')).toBeVisible();

  // The limit itself is allowed.
  const longest = 'y'.repeat(MAX_NAME_CHARS);
  await user.submitName(longest);
  await expect(user.byId('user-name')).toHaveText(longest);
});

test('signing out closes the live view and shows the sign-in form', async ({ newUser }) => {
  const user = await newUser();
  const sockets: import('@playwright/test').WebSocket[] = [];
  user.page.on('websocket', (ws) => sockets.push(ws));
  await user.signIn(unique('leaver'));
  await user.expectActive();
  expect(sockets.length, 'live connections opened').toBeGreaterThan(0);

  await user.waitInteractive('sign-out-button');
  await user.byId('sign-out-button').click();

  await expect(user.byId('sign-in-form')).toBeVisible();
  await expect(user.byId('user-name')).toHaveCount(0);
  await expect(user.byId('ask-input')).toHaveCount(0);
  await expect(user.byId('answers')).toHaveCount(0);
  await expect
    .poll(() => sockets.every((ws) => ws.isClosed()), { message: 'every live socket closed' })
    .toBe(true);
  // Nothing reconnects behind the sign-in form.
  await user.page.waitForTimeout(1_500);
  expect(sockets.every((ws) => ws.isClosed()), 'no socket reopened after sign-out').toBe(true);

  // The session is gone on the server too.
  await user.open();
  await expect(user.byId('sign-in-form')).toBeVisible();
  await expect(user.byId('user-name')).toHaveCount(0);
});
