//! Tries to get a token past `TokenKeys::verify` or `verify_publisher` that the keys never
//! minted: either arbitrary text, or a real token with one segment tampered with.
#![no_main]

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use app::protocol::TOPIC_AI;
use app::token::{unix_now, Claims, TokenKeys};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;

/// Test-only signing secret; it signs nothing outside this target.
const SECRET: &[u8] = b"fuzz-only-secret-fuzz-only-secret-0123456789";
/// A token is minted again when it has less than this many seconds to live.
const REMINT_MARGIN_SECS: u64 = 10;

static MINTER: LazyLock<Mutex<Minter>> = LazyLock::new(|| {
    let keys = TokenKeys::new(SECRET, Duration::from_secs(60)).expect("secret is long enough");
    let mut minter = Minter {
        keys,
        minted: Vec::new(),
        current: [0, 0],
    };
    minter.mint_both();
    Mutex::new(minter)
});

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Subscription,
    Publisher,
}

struct Minted {
    token: String,
    kind: Kind,
    /// The claims a subscription token was minted with.
    claims: Option<Claims>,
    exp: u64,
}

/// The keys, and every token they minted during this run: the only strings allowed to verify.
struct Minter {
    keys: TokenKeys,
    minted: Vec<Minted>,
    /// Indexes into `minted` of the live subscription and publisher tokens.
    current: [usize; 2],
}

impl Minter {
    fn mint_both(&mut self) {
        let topics = [TOPIC_AI.to_owned()];
        let (token, claims) = self
            .keys
            .mint("fuzz-user", "fuzz-binding", &topics)
            .expect("mint");
        let exp = claims.exp;
        self.minted.push(Minted {
            token,
            kind: Kind::Subscription,
            claims: Some(claims),
            exp,
        });
        self.current[0] = self.minted.len() - 1;

        let ttl = self.keys.ttl();
        let token = self
            .keys
            .mint_publisher("fuzz-publisher", ttl)
            .expect("mint publisher");
        self.minted.push(Minted {
            token,
            kind: Kind::Publisher,
            claims: None,
            exp: unix_now() + ttl.as_secs(),
        });
        self.current[1] = self.minted.len() - 1;
    }

    /// The live token of `kind`, minted again first if it is about to expire.
    fn current(&mut self, kind: Kind) -> &Minted {
        let oldest = self
            .current
            .iter()
            .map(|&i| self.minted[i].exp)
            .min()
            .unwrap_or(0);
        if oldest <= unix_now() + REMINT_MARGIN_SECS {
            self.mint_both();
        }
        &self.minted[self.current[kind as usize]]
    }

    fn find(&self, token: &str) -> Option<&Minted> {
        self.minted.iter().find(|m| m.token == token)
    }

    /// Verifies `token` both ways and panics on anything a forger could use.
    fn check(&self, token: &str) -> (bool, bool) {
        let subscription = self.keys.verify(token);
        let publisher = self.keys.verify_publisher(token);
        let minted = self.find(token);

        if let Ok(claims) = &subscription {
            match minted {
                Some(m) if m.kind == Kind::Subscription => {
                    assert_eq!(m.claims.as_ref(), Some(claims), "claims changed in transit")
                }
                _ => panic!("FORGERY: a token never minted as a subscription verified: {token}"),
            }
        }
        if publisher.is_ok() && !minted.is_some_and(|m| m.kind == Kind::Publisher) {
            panic!("FORGERY: a token never minted for a publisher verified: {token}");
        }
        (subscription.is_ok(), publisher.is_ok())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut minter = MINTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if mode & 1 == 0 {
        minter.check(&String::from_utf8_lossy(rest));
    } else {
        tamper(&mut minter, mode >> 1, rest);
    }
});

/// Structured mode. `op` picks the token (bit 0), the segment (bits 1-2: header, payload,
/// signature, or the whole token) and the edit (bits 3-5); `args` feeds the edit.
fn tamper(minter: &mut Minter, op: u8, args: &[u8]) {
    let kind = if op & 1 == 0 {
        Kind::Subscription
    } else {
        Kind::Publisher
    };
    let original = minter.current(kind).token.clone();
    let other = minter.current(other_kind(kind)).token.clone();

    let segment = usize::from((op >> 1) & 3);
    let edited = edit(&original, &other, segment, op >> 3, args);
    let (subscription, publisher) = minter.check(&edited);

    if edited == original {
        // A check that refused everything would pass the forgery asserts, so insist on this.
        let expected = (kind == Kind::Subscription, kind == Kind::Publisher);
        assert_eq!(
            (subscription, publisher),
            expected,
            "an untouched {kind:?} token failed"
        );
    } else if minter.find(&edited).is_none() {
        assert!(
            !subscription && !publisher,
            "a tampered token verified: {edited}"
        );
    }
}

fn other_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Subscription => Kind::Publisher,
        Kind::Publisher => Kind::Subscription,
    }
}

/// `original` with `segment` (3 means the whole token) changed by edit number `how`.
fn edit(original: &str, other: &str, segment: usize, how: u8, args: &[u8]) -> String {
    let mut parts: Vec<Vec<u8>> = original.split('.').map(|p| p.as_bytes().to_vec()).collect();
    let others: Vec<&str> = other.split('.').collect();
    let mut whole = original.as_bytes().to_vec();
    let target = if segment < parts.len() {
        &mut parts[segment]
    } else {
        &mut whole
    };

    match how {
        // Flip bits: pairs of (position, mask).
        0 => {
            for pair in args.chunks_exact(2) {
                if !target.is_empty() {
                    let at = usize::from(pair[0]) % target.len();
                    target[at] ^= pair[1];
                }
            }
        }
        // Replace with the raw bytes.
        1 => *target = args.to_vec(),
        // Replace with the bytes base64url-encoded, so fuzzed JSON reaches the claim checks.
        2 => *target = URL_SAFE_NO_PAD.encode(args).into_bytes(),
        // Truncate.
        3 => {
            let keep = args
                .first()
                .map_or(0, |&n| usize::from(n) % (target.len() + 1));
            target.truncate(keep);
        }
        // Insert bytes.
        4 => {
            if let Some((&at, bytes)) = args.split_first() {
                let at = usize::from(at) % (target.len() + 1);
                target.splice(at..at, bytes.iter().copied());
            }
        }
        // Splice in the same segment of the other kind of token.
        5 => {
            *target = match others.get(segment) {
                Some(part) => part.as_bytes().to_vec(),
                None => other.as_bytes().to_vec(),
            }
        }
        // Append bytes.
        _ => target.extend_from_slice(args),
    }

    let bytes = if segment < parts.len() {
        parts.join(&b'.')
    } else {
        whole
    };
    String::from_utf8_lossy(&bytes).into_owned()
}
