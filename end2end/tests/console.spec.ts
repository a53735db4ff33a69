// A normal session leaves the browser console clean: no errors, no warnings.
import { test, expect, unique } from './fixtures';

test('load, hydration, sign-in, reload and an answer log no errors or warnings', async ({
  newUser,
}) => {
  const user = await newUser();
  await user.signIn(unique('quiet'));
  await user.expectActive();

  // A signed-in page is rendered on the server and hydrated again.
  await user.page.reload();
  await user.waitInteractive('ask-button');
  await user.expectActive();

  const answer = await user.ask(unique('a question that should log nothing'));
  await user.expectComplete(answer);

  expect(user.problems).toEqual([]);
});
