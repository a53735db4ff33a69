//! Where a subscription is in its channel: which messages were already delivered (to drop
//! duplicates) and from which position a reconnect resumes.

use crate::protocol::{Envelope, Position};

/// The reader's place in the channel's history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The newest message delivered to the page.
    last_delivered: Option<Position>,
    /// The newest position known to be covered: the last message, or a head the server said
    /// needs no replay.
    resume_from: Option<Position>,
}

impl Cursor {
    /// A cursor that asks for everything `epoch` still holds: a page reloaded in a tab that
    /// had been reading that epoch gets the channel's history back.
    pub fn replaying(epoch: String) -> Self {
        Self {
            last_delivered: None,
            resume_from: Some(Position { epoch, offset: 0 }),
        }
    }

    /// Records `message` and says whether it is new. A message is a duplicate when an equal
    /// or later offset of the same epoch was already delivered; a new epoch starts afresh.
    pub fn accept(&mut self, message: &Envelope) -> bool {
        if let Some(last) = &self.last_delivered {
            if last.epoch == message.epoch && message.offset <= last.offset {
                return false;
            }
        }
        self.last_delivered = Some(message.position());
        self.advance(message.position());
        true
    }

    /// Records the channel head from a `subscribed` reply that replays nothing: everything up
    /// to it is either delivered or was published before this subscription wanted it.
    pub fn skip_to(&mut self, head: Position) {
        self.advance(head);
    }

    /// The position to send as `resume` on the next `auth`, if any was seen.
    pub fn resume_point(&self) -> Option<Position> {
        self.resume_from.clone()
    }

    fn advance(&mut self, to: Position) {
        let behind = match &self.resume_from {
            Some(current) => current.epoch != to.epoch || current.offset < to.offset,
            None => true,
        };
        if behind {
            self.resume_from = Some(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageKind;

    fn message(epoch: &str, offset: u64) -> Envelope {
        Envelope {
            kind: MessageKind::Data,
            id: format!("{epoch}-{offset}"),
            channel: "user:u".into(),
            topic: "ai".into(),
            data: serde_json::Value::Null,
            created_at: 0,
            run_id: None,
            stream_id: None,
            epoch: epoch.into(),
            offset,
        }
    }

    fn position(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn repeated_and_older_offsets_are_dropped() {
        let mut cursor = Cursor::default();
        assert!(cursor.accept(&message("a", 1)));
        assert!(cursor.accept(&message("a", 2)));
        assert!(!cursor.accept(&message("a", 2)));
        assert!(!cursor.accept(&message("a", 1)));
        assert!(cursor.accept(&message("a", 5)));
        assert_eq!(cursor.resume_point(), Some(position("a", 5)));
    }

    #[test]
    fn a_new_epoch_starts_over() {
        let mut cursor = Cursor::default();
        assert!(cursor.accept(&message("a", 9)));
        assert!(cursor.accept(&message("b", 1)));
        assert!(!cursor.accept(&message("b", 1)));
        assert_eq!(cursor.resume_point(), Some(position("b", 1)));
    }

    #[test]
    fn a_replaying_cursor_asks_for_the_whole_epoch_and_takes_every_message() {
        let mut cursor = Cursor::replaying("a".into());
        assert_eq!(cursor.resume_point(), Some(position("a", 0)));
        assert!(cursor.accept(&message("a", 1)));
        assert!(cursor.accept(&message("a", 2)));
        assert_eq!(cursor.resume_point(), Some(position("a", 2)));
    }

    #[test]
    fn resume_follows_the_head_but_never_goes_back() {
        let mut cursor = Cursor::default();
        assert_eq!(cursor.resume_point(), None);
        cursor.skip_to(position("a", 4));
        assert_eq!(cursor.resume_point(), Some(position("a", 4)));
        cursor.skip_to(position("a", 2));
        assert_eq!(cursor.resume_point(), Some(position("a", 4)));
        // The head does not count as delivered: a message at a lower offset is still new.
        assert!(cursor.accept(&message("a", 3)));
        assert_eq!(cursor.resume_point(), Some(position("a", 4)));
        cursor.skip_to(position("b", 0));
        assert_eq!(cursor.resume_point(), Some(position("b", 0)));
    }
}
