//! `kupgrade report`: the report `kupgrade-init` left, read against what the
//! store holds now. `kupgrade-init` records a restore as `restoring` before
//! it begins and marks the image in the store as it goes, so a report that
//! still says `restoring`, or a store whose image is not the one the report
//! is about, means a restore that never finished (a reset, a crash, a hang)
//! and a report that cannot be taken at its word.

use std::fs::File;
use std::path::Path;

use contract::report::{Outcome, UpgradeReport};
use image_format::State;

/// What the store holds when the report is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSays {
    Image {
        generation: u64,
        state: State,
    },
    /// No image (wiped after its restore, or never written).
    Empty,
    /// The store could not be read; why.
    Unreadable(String),
}

/// Reads the superblock of the store at `path`.
pub fn store_says(path: &Path) -> StoreSays {
    let unreadable =
        |e: &dyn std::fmt::Display| StoreSays::Unreadable(format!("{}: {e}", path.display()));
    let mut store = match File::open(path) {
        Ok(f) => f,
        Err(e) => return unreadable(&e),
    };
    match image_format::read_superblock(&mut store) {
        Ok(sb) => StoreSays::Image {
            generation: sb.generation,
            state: sb.state,
        },
        Err(image_format::Error::NoImage) => StoreSays::Empty,
        Err(e) => unreadable(&e),
    }
}

/// Why `report` cannot be taken at its word, given what the store holds;
/// `None` when the two agree.
pub fn doubt(report: &UpgradeReport, store: &StoreSays) -> Option<String> {
    let n = report.image_generation;
    let now = match store {
        StoreSays::Image { generation, state } if *generation == n => {
            format!("the store marks generation {n} {state}")
        }
        StoreSays::Image { generation, state } => {
            format!("the store holds generation {generation}, marked {state}")
        }
        StoreSays::Empty => "the store holds no image any more".to_string(),
        StoreSays::Unreadable(why) => format!("the store cannot be read ({why})"),
    };
    if report.outcome == Outcome::Restoring {
        return Some(format!(
            "the restore of generation {n} began but never ended: kupgrade-init was \
             stopped (a reset, a crash, a hang) before it could say how it went; {now}"
        ));
    }
    match store {
        StoreSays::Image { generation, state } if *generation != n => Some(match state {
            State::Written => format!(
                "{now}: an image written and not restored, which this report (of \
                 generation {n}) is not about"
            ),
            _ => format!(
                "{now}: a restore of it began and left no report; this report is of \
                 the earlier generation {n}"
            ),
        }),
        StoreSays::Image { state, .. } => {
            let agrees = match report.outcome {
                Outcome::Restored => *state == State::Restored,
                _ => *state == State::Failed,
            };
            (!agrees).then(|| format!("{now}, which this report does not say"))
        }
        StoreSays::Empty | StoreSays::Unreadable(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: Outcome, generation: u64) -> UpgradeReport {
        UpgradeReport {
            outcome,
            reason: None,
            kernel_from: "6.1.0-1".into(),
            kernel_to: "6.1.0-2".into(),
            image_generation: generation,
            workloads: vec![],
            events: vec![],
            store: Some("/dev/pmem0".into()),
            modules_failed: vec![],
        }
    }

    fn image(generation: u64, state: State) -> StoreSays {
        StoreSays::Image { generation, state }
    }

    /// The report and the store agree: nothing to say.
    #[test]
    fn a_report_the_store_agrees_with_is_taken_at_its_word() {
        for (r, s) in [
            (report(Outcome::Restored, 7), StoreSays::Empty),
            (report(Outcome::Restored, 7), image(7, State::Restored)),
            (report(Outcome::Failed, 7), StoreSays::Empty),
            (report(Outcome::Failed, 7), image(7, State::Failed)),
            (
                report(Outcome::Failed, 7),
                StoreSays::Unreadable("EACCES".into()),
            ),
        ] {
            assert_eq!(doubt(&r, &s), None, "{r:?} {s:?}");
        }
    }

    /// A report left at `restoring`: the restore never ended, whatever the
    /// store says, and what it says is told.
    #[test]
    fn a_report_still_restoring_says_the_restore_never_ended() {
        let r = report(Outcome::Restoring, 7);
        for (s, says) in [
            (
                image(7, State::Restoring),
                "the store marks generation 7 restoring",
            ),
            (StoreSays::Empty, "the store holds no image any more"),
            (
                image(8, State::Written),
                "the store holds generation 8, marked written",
            ),
        ] {
            let d = doubt(&r, &s).unwrap_or_default();
            assert!(
                d.starts_with("the restore of generation 7 began but never ended")
                    && d.ends_with(says),
                "{d}"
            );
        }
    }

    /// The store holds another generation than the report: a later restore
    /// that left no report (a crash before its record), or an image waiting.
    #[test]
    fn a_report_of_another_generation_than_the_store_is_stale() {
        let r = report(Outcome::Restored, 6);
        let d = doubt(&r, &image(7, State::Restoring)).unwrap_or_default();
        assert_eq!(
            d,
            "the store holds generation 7, marked restoring: a restore of it began and \
             left no report; this report is of the earlier generation 6"
        );
        let d = doubt(&r, &image(7, State::Written)).unwrap_or_default();
        assert!(d.contains("written and not restored"), "{d}");
    }

    /// The same generation, but the store says otherwise than the report.
    #[test]
    fn a_store_that_contradicts_the_report_is_told() {
        let d = doubt(&report(Outcome::Restored, 7), &image(7, State::Restoring));
        assert_eq!(
            d.as_deref(),
            Some("the store marks generation 7 restoring, which this report does not say")
        );
        assert!(doubt(&report(Outcome::Failed, 7), &image(7, State::Restored)).is_some());
    }

    #[test]
    fn the_store_is_read_from_its_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        assert_eq!(store_says(&path), StoreSays::Empty);
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let opts = image_format::WriteOptions {
            generation: 42,
            ..Default::default()
        };
        let w = image_format::ImageWriter::create(file, 1 << 20, opts).unwrap();
        w.finish(image_format::Manifest::default()).unwrap();
        assert_eq!(store_says(&path), image(42, State::Written));
        let missing = dir.path().join("missing");
        assert!(matches!(store_says(&missing), StoreSays::Unreadable(_)));
    }
}
