//! The one binary encoding nodes store and send each other: postcard
//! behind a format byte, so the next change of format can be told apart and
//! rolled out node by node.
//!
//! `[FORMAT_V1] ++ postcard(value)`. The format byte is 0xC1, never 0 or 1:
//! the release before this one read the same values with bincode 1.3, whose
//! first field is an `Option` or a `bool` for every value it reads at start
//! (applied log id, membership), so it refuses a data dir this one wrote
//! instead of misreading it.
//!
//! [`Codec::Legacy`] is bincode 1.3 (unmaintained, RUSTSEC-2025-0141): kept
//! only to read a data dir of that release once ([`crate::consensus::store`]
//! migrates it at open) and to speak to its nodes during a rolling upgrade
//! (the peer transport negotiates per peer). The next release drops it.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format byte of postcard values.
pub const FORMAT_V1: u8 = 0xC1;

/// Header on every authenticated peer answer: the codecs this node reads
/// beyond legacy, so a caller may switch to the newest both know.
pub const ACCEPTS_HEADER: &str = "x-clb-codec-accepts";

/// How a value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// bincode 1.3, what the release before postcard spoke and stored.
    #[default]
    Legacy,
    /// [`FORMAT_V1`] then postcard.
    V1,
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("format byte {0:#04x} is not one this node reads (newer clbd?)")]
    Format(u8),
    #[error("postcard: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("bincode: {0}")]
    Bincode(#[from] bincode::Error),
}

impl Codec {
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Codec::Legacy => Ok(bincode::serialize(value)?),
            Codec::V1 => {
                let out = postcard::to_extend(value, vec![FORMAT_V1])?;
                Ok(out)
            }
        }
    }

    pub fn decode<T: DeserializeOwned>(self, raw: &[u8]) -> Result<T, CodecError> {
        match self {
            Codec::Legacy => Ok(bincode::deserialize(raw)?),
            Codec::V1 => match raw.split_first() {
                None => Err(CodecError::Empty),
                Some((&FORMAT_V1, rest)) => Ok(postcard::from_bytes(rest)?),
                Some((&other, _)) => Err(CodecError::Format(other)),
            },
        }
    }

    /// The newest codec an [`ACCEPTS_HEADER`] value (comma-separated
    /// versions) lets a caller use.
    pub fn best_accepted(value: Option<&str>) -> Codec {
        let accepts_v1 = value.is_some_and(|v| v.split(',').any(|s| s.trim() == "1"));
        if accepts_v1 {
            Codec::V1
        } else {
            Codec::Legacy
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Legacy => "legacy",
            Codec::V1 => "v1",
        }
    }
}

/// [`Codec::V1`]: how everything new is encoded.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Codec::V1.encode(value)
}

/// [`Codec::V1`].
pub fn decode<T: DeserializeOwned>(raw: &[u8]) -> Result<T, CodecError> {
    Codec::V1.decode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership, Vote};

    type Lid = LogId<u64>;

    #[test]
    fn v1_round_trips_and_carries_its_format_byte() {
        let vote = Vote::new_committed(7, 2);
        let raw = encode(&vote).unwrap();
        assert_eq!(raw[0], FORMAT_V1);
        assert_eq!(decode::<Vote<u64>>(&raw).unwrap(), vote);
        assert!(matches!(
            decode::<Vote<u64>>(&[0xC2, 0]),
            Err(CodecError::Format(0xC2))
        ));
        assert!(matches!(decode::<Vote<u64>>(&[]), Err(CodecError::Empty)));
    }

    /// The release before reads the applied log id and the membership with
    /// bincode when it opens a data dir: both must fail on a v1 value, so
    /// that release refuses a migrated dir rather than misread it.
    #[test]
    fn the_previous_release_cannot_misread_what_v1_stores() {
        let applied: Option<Lid> = Some(LogId::new(CommittedLeaderId::new(3, 1), 42));
        let membership: StoredMembership<u64, openraft::BasicNode> = StoredMembership::new(
            applied,
            openraft::Membership::new(vec![[1, 2, 3].into()], None),
        );
        let e = Codec::Legacy
            .decode::<Option<Lid>>(&encode(&applied).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("tag"), "{e}");
        assert!(Codec::Legacy
            .decode::<StoredMembership<u64, openraft::BasicNode>>(&encode(&membership).unwrap())
            .is_err());
    }

    #[test]
    fn the_accepts_header_names_the_newest_codec_both_read() {
        assert_eq!(Codec::best_accepted(Some("1")), Codec::V1);
        assert_eq!(Codec::best_accepted(Some("2, 1")), Codec::V1);
        assert_eq!(Codec::best_accepted(Some("2")), Codec::Legacy);
        assert_eq!(Codec::best_accepted(None), Codec::Legacy);
    }
}
