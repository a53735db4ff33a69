// A signed-in user asks a question and watches the answer arrive over the live connection.
import { test, expect, unique } from './fixtures';

test('an answer streams in chunk by chunk without a reload, then completes', async ({
  newUser,
}) => {
  const user = await newUser();
  await user.signIn(unique('streamer'));
  await user.expectActive();

  await user.recordAnswers();
  const prompt = unique('how do websockets, tokens and channels fit together');
  const answer = await user.ask(prompt);
  const text = await user.expectComplete(answer);
  await user.expectActive();

  // A start, every chunk and an end arrived as messages of their own.
  const expected = Number(await answer.getAttribute('data-expected-chunks'));
  expect(await user.messageCount()).toBeGreaterThanOrEqual(expected + 2);

  const runId = await answer.getAttribute('data-run-id');
  expect(runId, 'data-run-id').toBeTruthy();
  const samples = (await user.samples()).filter((s) => s.runId === runId);
  const partial = samples.filter((s) => s.complete === 'false');
  const partialCounts = [...new Set(partial.map((s) => s.chunks))];
  expect(
    partialCounts.length,
    `distinct chunk counts seen before completion: ${partialCounts.join(', ')}`,
  ).toBeGreaterThanOrEqual(2);
  for (let i = 1; i < samples.length; i++) {
    expect(samples[i].chunks, 'data-chunks never goes down').toBeGreaterThanOrEqual(
      samples[i - 1].chunks,
    );
  }
  // Text shows up with the first chunks, long before the last one.
  const early = partial.find((s) => s.chunks > 0 && s.chunks < expected);
  expect(early, 'a sample with some but not all chunks').toBeDefined();
  expect(early!.textLength, 'text after the first chunks').toBeGreaterThan(0);
  expect(early!.textLength, 'text after the first chunks').toBeLessThan(text.length);
  const completedAt = samples.find((s) => s.complete === 'true')?.at ?? 0;
  expect(completedAt - partial[0].at, 'ms from first chunk to completion').toBeGreaterThan(40);
});

test('the same prompt asked twice gives the same text under two run ids', async ({ newUser }) => {
  const user = await newUser();
  await user.signIn(unique('repeater'));
  await user.expectActive();
  const prompt = unique('say the same thing twice');

  const first = await user.ask(prompt);
  const firstText = await user.expectComplete(first);
  await user.byId('ask-input').fill(prompt);
  await user.byId('ask-button').click();
  const both = user.answerFor(prompt);
  await expect(both).toHaveCount(2);
  const texts = [];
  for (const card of await both.all()) texts.push(await user.expectComplete(card));

  expect(texts).toEqual([firstText, firstText]);
  const runIds = await both.evaluateAll((cards) => cards.map((c) => c.getAttribute('data-run-id')));
  expect(new Set(runIds).size, `run ids ${runIds.join(', ')}`).toBe(2);
});
