//! What a signed-in user sees: who they are, the connection, the ask form and the answers as
//! they stream in.

use leptos::html::Input;
use leptos::prelude::*;

use super::answers::{group_answers, Answer};
use crate::api::{Ask, SignOut, UserView};
use crate::protocol::{Recovery, TOPIC_AI};
use crate::realtime::{use_realtime, RealtimeError, RealtimeOptions, RealtimeSubscription};

#[component]
pub fn LivePanel(
    user: UserView,
    sign_out: ServerAction<SignOut>,
    /// Called when the connection reports that the session is gone.
    session_ended: Callback<String>,
) -> impl IntoView {
    let live = use_realtime(RealtimeOptions::new([TOPIC_AI]));
    Effect::new(move |_| {
        let ending = live.error.with(|e| {
            e.as_ref()
                .filter(|e| e.ends_session())
                .map(RealtimeError::to_string)
        });
        if let Some(why) = ending {
            session_ended.run(why);
        }
    });

    view! {
        <section class="panel session">
            <p>"Signed in as " <strong data-testid="user-name">{user.name}</strong></p>
            <ActionForm action=sign_out attr:class="sign-out">
                <button type="submit" class="secondary" data-testid="sign-out-button">
                    "Sign out"
                </button>
            </ActionForm>
        </section>
        <ConnectionStatus live/>
        <AskForm/>
        <AnswerList live/>
    }
}

#[component]
fn ConnectionStatus(live: RealtimeSubscription) -> impl IntoView {
    let state = move || live.state.get().as_str();
    let error = move || live.error.get().map(|e| e.to_string());
    let missed = move || {
        live.recovery
            .get()
            .filter(|r| !r.complete)
            .map(describe_gap)
    };

    view! {
        <section class="status">
            <p>
                "Connection: "
                <span class="state" data-testid="connection-state" data-state=state>
                    {state}
                </span>
            </p>
            <Show when=move || error().is_some()>
                <p class="error" role="alert" data-testid="realtime-error">
                    {error}
                </p>
            </Show>
            <Show when=move || missed().is_some()>
                <p class="notice" data-testid="recovery-notice">
                    {missed}
                </p>
            </Show>
        </section>
    }
}

fn describe_gap(recovery: Recovery) -> String {
    let why = match recovery.reason.as_deref() {
        Some("epoch_changed") => "the server lost its history (epoch_changed)".to_string(),
        Some("history_expired") => "the history no longer reaches back (history_expired)".into(),
        Some("unknown_position") => "the server did not know our place (unknown_position)".into(),
        Some(other) => other.to_string(),
        None => "no reason given".into(),
    };
    format!("Some messages may have been missed while reconnecting: {why}.")
}

#[component]
fn AskForm() -> impl IntoView {
    let ask = ServerAction::<Ask>::new();
    let prompt_input = NodeRef::<Input>::new();
    let error = move || {
        ask.value()
            .get()
            .and_then(Result::err)
            .map(|e| e.to_string())
    };

    // A question that was accepted leaves the box empty for the next one.
    Effect::new(move |_| {
        if let Some(Ok(_)) = ask.value().get() {
            if let Some(input) = prompt_input.get_untracked() {
                input.set_value("");
            }
        }
    });

    view! {
        <section class="panel">
            <ActionForm action=ask attr:class="ask">
                <label for="ask-input">"Your question"</label>
                <div class="row">
                    <input
                        id="ask-input"
                        type="text"
                        name="prompt"
                        autocomplete="off"
                        placeholder="What is a WebSocket?"
                        node_ref=prompt_input
                        data-testid="ask-input"
                    />
                    <button
                        type="submit"
                        data-testid="ask-button"
                        disabled=move || ask.pending().get()
                    >
                        "Ask"
                    </button>
                </div>
            </ActionForm>
            <Show when=move || error().is_some()>
                <p class="error" role="alert" data-testid="ask-error">
                    {error}
                </p>
            </Show>
        </section>
    }
}

#[component]
fn AnswerList(live: RealtimeSubscription) -> impl IntoView {
    let answers = Memo::new(move |_| live.data.with(|messages| group_answers(messages)));
    let message_count = move || live.data.with(Vec::len);

    view! {
        <section class="answers-panel">
            <h2>"Answers"</h2>
            <p class="count">
                "Messages received: " <span data-testid="message-count">{message_count}</span>
            </p>
            <ol class="answers" data-testid="answers">
                <For
                    each=move || answers.get()
                    key=|answer| {
                        let progress = (answer.chunks_received(), answer.expected_chunks);
                        (answer.run_id.clone(), answer.prompt.is_some(), progress)
                    }
                    children=|answer| view! { <AnswerItem answer/> }
                />
            </ol>
        </section>
    }
}

#[component]
fn AnswerItem(answer: Answer) -> impl IntoView {
    let complete = answer.is_complete();
    // Joined mid-stream (a page opened while the answer streamed): say so, never pass it off
    // as the whole answer.
    let failed = answer
        .failure
        .clone()
        .map(|why| format!("This answer stopped early: {why}."));
    let gap = (answer.is_finished() && !complete && failed.is_none()).then(|| {
        let expected = answer.expected_chunks.unwrap_or(0);
        format!(
            "Part of this answer was missed: {} of {expected} pieces arrived.",
            answer.chunks_received()
        )
    });
    let expected = answer
        .expected_chunks
        .map(|n| n.to_string())
        .unwrap_or_default();
    let prompt = answer
        .prompt
        .clone()
        .unwrap_or_else(|| "(question not received)".into());

    view! {
        <li
            class="answer"
            class:complete=complete
            data-testid="answer"
            data-run-id=answer.run_id.clone()
            data-complete=complete.to_string()
            data-chunks=answer.chunks_received().to_string()
            data-expected-chunks=expected
        >
            <p class="answer-prompt" data-testid="answer-prompt">{prompt}</p>
            <p class="answer-text" data-testid="answer-text">{answer.text()}</p>
            {gap.map(|gap| view! { <p class="notice" data-testid="answer-gap">{gap}</p> })}
            {failed.map(|why| view! { <p class="error" data-testid="answer-failed">{why}</p> })}
        </li>
    }
}
