//! The life of an image, as its superblock records it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The life of an image: only a `Written` one is ever restored.
/// `written -> restoring -> restored | failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Written = 1,
    Restoring = 2,
    Restored = 3,
    Failed = 4,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Written,
        State::Restoring,
        State::Restored,
        State::Failed,
    ];

    pub fn from_u32(v: u32) -> Option<State> {
        State::ALL.into_iter().find(|s| *s as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Written => "written",
            State::Restoring => "restoring",
            State::Restored => "restored",
            State::Failed => "failed",
        }
    }

    /// Whether an image may move from `self` to `to`. Nothing goes back to
    /// `written`: an image that a restore has started on is never restored
    /// a second time. Setting the state it already has is allowed.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        self == to
            || matches!(
                (self, to),
                (Written, Restoring) | (Written, Failed) | (Restoring, Restored | Failed)
            )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is none of the states' (see [`State::name`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown image state {0:?}")]
pub struct UnknownStateName(pub String);

impl FromStr for State {
    type Err = UnknownStateName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| UnknownStateName(s.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_print_parse_and_only_move_forward() {
        for s in State::ALL {
            assert_eq!(s.to_string().parse::<State>().unwrap(), s);
            assert_eq!(State::from_u32(s as u32), Some(s));
            assert!(s.can_become(s));
            if s != State::Written {
                assert!(!s.can_become(State::Written), "{s} -> written");
            }
        }
        assert_eq!(State::Restoring.to_string(), "restoring");
        assert!(State::Written.can_become(State::Restoring));
        assert!(State::Restoring.can_become(State::Restored));
        assert!(State::Restoring.can_become(State::Failed));
        assert!(!State::Restored.can_become(State::Restoring));
        assert!(!State::Failed.can_become(State::Restored));
        assert_eq!(State::from_u32(0), None);
        assert_eq!(State::from_u32(5), None);
        let e = "resumed".parse::<State>().unwrap_err();
        assert_eq!(e, UnknownStateName("resumed".into()));
        assert_eq!(e.to_string(), "unknown image state \"resumed\"");
    }
}
