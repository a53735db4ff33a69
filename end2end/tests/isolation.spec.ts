// Two users signed in at once each see only their own channel.
import { test, expect, unique, type AppUser } from './fixtures';

async function expectOnly(user: AppUser, ownPrompts: string[], foreign: string[]) {
  await expect(user.byId('answer')).toHaveCount(ownPrompts.length);
  for (const prompt of ownPrompts) await expect(user.answerFor(prompt)).toHaveCount(1);
  for (const other of foreign) {
    await expect(user.page.locator(`[data-run-id="${other}"]`)).toHaveCount(0);
    await expect(user.byId('answers')).not.toContainText(other);
  }
}

test("a user never sees another user's answers, even while both are live", async ({
  newUser,
}) => {
  const alice = await newUser();
  const bob = await newUser();
  await alice.signIn(unique('alice'));
  await bob.signIn(unique('bob'));
  await Promise.all([alice.expectActive(), bob.expectActive()]);

  const alicePrompt = unique('alice asks about channels');
  const bobPrompt = unique('bob asks about topics');
  const [aliceAnswer, bobAnswer] = await Promise.all([
    alice.ask(alicePrompt),
    bob.ask(bobPrompt),
  ]);
  await Promise.all([alice.expectComplete(aliceAnswer), bob.expectComplete(bobAnswer)]);
  const aliceRun = (await aliceAnswer.getAttribute('data-run-id')) ?? '';
  const bobRun = (await bobAnswer.getAttribute('data-run-id')) ?? '';
  expect(aliceRun).not.toEqual(bobRun);

  await expectOnly(alice, [alicePrompt], [bobPrompt, bobRun]);
  await expectOnly(bob, [bobPrompt], [alicePrompt, aliceRun]);

  // Alice alone streams now; Bob's connection stays open the whole time.
  const bobCount = await bob.messageCount();
  const secondPrompt = unique('alice asks again');
  const second = await alice.ask(secondPrompt);
  await alice.expectComplete(second);
  const secondRun = (await second.getAttribute('data-run-id')) ?? '';
  await bob.expectActive();
  expect(await bob.messageCount(), "Bob's message count while only Alice streams").toBe(bobCount);
  await expectOnly(bob, [bobPrompt], [alicePrompt, secondPrompt, aliceRun, secondRun]);
  await expectOnly(alice, [alicePrompt, secondPrompt], [bobPrompt, bobRun]);
});
