//! The home page: a sign-in form for visitors, the live answer view for signed-in users.

mod answers;
mod live;

use leptos::prelude::*;

use crate::api::{current_user, SignIn, SignOut, MAX_NAME_CHARS};
pub use answers::{group_answers, Answer};

#[component]
pub fn HomePage() -> impl IntoView {
    let sign_in = ServerAction::<SignIn>::new();
    let sign_out = ServerAction::<SignOut>::new();
    // Why the last live connection was closed by the server's end of the session, shown on the
    // sign-in form that replaces it.
    let ended = RwSignal::new(None::<String>);
    let user_resource = Resource::new(
        move || (sign_in.version().get(), sign_out.version().get()),
        |_| current_user(),
    );

    view! {
        <header class="masthead">
            <h1>"leptos-realtime"</h1>
            <p class="tagline">"Ask a question and watch the answer arrive live."</p>
        </header>
        <Transition fallback=|| view! { <p class="loading">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match user_resource.await {
                    Ok(Some(user)) => {
                        // A session that ended elsewhere (another tab, expiry) shows sign-in.
                        let session_ended = Callback::new(move |why: String| {
                            ended.set(Some(why));
                            user_resource.refetch();
                        });
                        view! { <live::LivePanel user sign_out session_ended/> }.into_any()
                    }
                    Ok(None) => view! { <SignInForm sign_in ended/> }.into_any(),
                    Err(e) => view! { <p class="error">{e.to_string()}</p> }.into_any(),
                }
            })}
        </Transition>
    }
}

#[component]
fn SignInForm(sign_in: ServerAction<SignIn>, ended: RwSignal<Option<String>>) -> impl IntoView {
    let error = move || {
        sign_in
            .value()
            .get()
            .and_then(Result::err)
            .map(|e| e.to_string())
    };

    view! {
        <section class="panel">
            <h2>"Sign in"</h2>
            <Show when=move || ended.with(Option::is_some)>
                <p class="notice" role="status" data-testid="session-notice">
                    "Your session has ended. " {move || ended.get()}
                </p>
            </Show>
            <ActionForm action=sign_in attr:class="sign-in" attr:data-testid="sign-in-form">
                <label for="name-input">"Display name"</label>
                <div class="row">
                    <input
                        id="name-input"
                        type="text"
                        name="name"
                        autocomplete="nickname"
                        placeholder="Ada"
                        data-testid="name-input"
                    />
                    <button
                        type="submit"
                        data-testid="sign-in-button"
                        disabled=move || sign_in.pending().get()
                    >
                        "Sign in"
                    </button>
                </div>
            </ActionForm>
            <p class="hint">{format!("Up to {MAX_NAME_CHARS} characters.")}</p>
            <Show when=move || error().is_some()>
                <p class="error" role="alert" data-testid="sign-in-error">
                    {error}
                </p>
            </Show>
        </section>
    }
}
