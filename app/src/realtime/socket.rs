//! Thin owners of browser resources: a WebSocket with its event handlers, and a timeout.
//! Dropping either detaches its callbacks, so nothing fires for an owner that is gone.

use std::time::Duration;

use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{BinaryType, CloseEvent, Event, MessageEvent, WebSocket};

use crate::protocol::{close, ClientCommand, WS_PATH};

/// What a [`Socket`] reports.
pub(super) struct SocketEvents {
    pub on_open: Box<dyn FnMut()>,
    pub on_text: Box<dyn FnMut(String)>,
    pub on_close: Box<dyn FnMut(u16, String)>,
}

/// An open (or opening) WebSocket. Dropping it closes the connection with code 1000.
pub(super) struct Socket {
    ws: WebSocket,
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

impl Socket {
    pub fn open(url: &str, events: SocketEvents) -> Result<Self, String> {
        let ws = WebSocket::new(url).map_err(describe_js)?;
        ws.set_binary_type(BinaryType::Arraybuffer);

        let SocketEvents {
            mut on_open,
            mut on_text,
            mut on_close,
        } = events;
        let on_open = Closure::<dyn FnMut(Event)>::new(move |_: Event| on_open());
        // The protocol is text only; a binary frame is the server's mistake and is skipped.
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            if let Some(text) = event.data().as_string() {
                on_text(text);
            }
        });
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
            on_close(event.code(), event.reason());
        });

        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        Ok(Self {
            ws,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
        })
    }

    pub fn send(&self, command: &ClientCommand) -> Result<(), String> {
        let text = serde_json::to_string(command).map_err(|e| e.to_string())?;
        self.ws.send_with_str(&text).map_err(describe_js)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        match self.ws.ready_state() {
            // Closing a socket that is still connecting makes the browser warn; close it as
            // soon as it opens instead.
            // Limitation: when that socket never opens, this one-shot handler is never freed.
            WebSocket::CONNECTING => {
                let ws = self.ws.clone();
                let close_when_open = Closure::once_into_js(move || {
                    _ = ws.close_with_code_and_reason(close::NORMAL, "client closed");
                });
                self.ws.set_onopen(Some(close_when_open.unchecked_ref()));
            }
            WebSocket::OPEN => {
                _ = self
                    .ws
                    .close_with_code_and_reason(close::NORMAL, "client closed");
            }
            _ => {}
        }
    }
}

/// The broker's address on the host that served the page.
pub(super) fn broker_url() -> Result<String, String> {
    let location = web_sys::window().ok_or("no window")?.location();
    let protocol = location.protocol().map_err(describe_js)?;
    let host = location.host().map_err(describe_js)?;
    let scheme = if protocol == "https:" { "wss:" } else { "ws:" };
    Ok(format!("{scheme}//{host}{WS_PATH}"))
}

/// The epoch this tab last read on `channel`, kept in session storage so that a reloaded page
/// can ask for the channel's history again. Holds no token and no message.
pub(super) fn remembered_epoch(channel: &str) -> Option<String> {
    session_storage()?.get_item(&epoch_key(channel)).ok()?
}

/// Records `epoch` for [`remembered_epoch`]; without session storage, a reload starts live.
pub(super) fn remember_epoch(channel: &str, epoch: &str) {
    if let Some(storage) = session_storage() {
        _ = storage.set_item(&epoch_key(channel), epoch);
    }
}

fn session_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok()?
}

fn epoch_key(channel: &str) -> String {
    format!("leptos-realtime:epoch:{channel}")
}

/// A pending `setTimeout`. Dropping it cancels the callback.
pub(super) struct Timer {
    handle: i32,
    _callback: Closure<dyn FnMut()>,
}

impl Timer {
    /// Runs `callback` after `delay`. `None` only when the browser refuses to set a timeout.
    pub fn once(delay: Duration, callback: impl FnOnce() + 'static) -> Option<Self> {
        let window = web_sys::window()?;
        let callback = Closure::<dyn FnMut()>::once(callback);
        let millis = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX);
        let handle = window
            .set_timeout_with_callback_and_timeout_and_arguments_0(
                callback.as_ref().unchecked_ref(),
                millis,
            )
            .ok()?;
        Some(Self {
            handle,
            _callback: callback,
        })
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some(window) = web_sys::window() {
            window.clear_timeout_with_handle(self.handle);
        }
    }
}

/// Milliseconds on the browser's clock.
pub(super) fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// A uniform random number in `[0, 1)`.
pub(super) fn random_unit() -> f64 {
    js_sys::Math::random()
}

fn describe_js(value: JsValue) -> String {
    value
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}
