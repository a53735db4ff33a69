// The broker refuses a subscription token whose signature does not verify, and the page says so.
import { test, expect, unique } from './fixtures';

/// Changes one character in the middle of the JWT signature. A middle character of base64url
/// always maps to signature bits (only the last one can carry padding bits), so the result
/// never verifies.
function breakSignature(token: string): string {
  const parts = token.split('.');
  expect(parts, 'token has header.payload.signature').toHaveLength(3);
  const sig = parts[2];
  const i = Math.floor(sig.length / 2);
  parts[2] = sig.slice(0, i) + (sig[i] === 'A' ? 'B' : 'A') + sig.slice(i + 1);
  return parts.join('.');
}

test('a token with a broken signature is refused with close code 4001', async ({ newUser }) => {
  const user = await newUser();
  let corrupted = 0;
  await user.page.route('**/api/subscription_token*', async (route) => {
    const response = await route.fetch();
    if (!response.ok()) return route.fulfill({ response });
    const grant = await response.json();
    expect(typeof grant.token, 'token grant JSON has a string `token`').toBe('string');
    grant.token = breakSignature(grant.token);
    corrupted += 1;
    await route.fulfill({ response, json: grant });
  });

  await user.signIn(unique('forger'));

  await expect(user.byId('realtime-error')).toContainText('4001');
  expect(corrupted, 'token responses rewritten').toBeGreaterThan(0);
  await expect(user.byId('connection-state')).not.toHaveAttribute('data-state', 'active');
});
