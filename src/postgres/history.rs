//! Timeline history files: `TTTTTTTT.history` lists, for each ancestor timeline, the LSN
//! where the next timeline branched off it (`parentTLI <tab> X/Y <tab> reason`). From it,
//! the path of WAL a recovery on that timeline replays: which timeline covers which range.

use super::walname::Lsn;

/// One stretch of a timeline's ancestry: WAL of `timeline` from `begin` up to (not
/// including) `end` (`None`: open-ended, the timeline itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelineSpan {
    /// Timeline.
    pub timeline: u32,
    /// First LSN on it (0 for the first).
    pub begin: Lsn,
    /// Where the next timeline branched off, if it did.
    pub end: Option<Lsn>,
}

/// Parses a history file into the path to `timeline`: its ancestors, oldest first, then
/// itself.
///
/// # Errors
/// A malformed line.
pub fn parse_history(timeline: u32, text: &str) -> Result<Vec<TimelineSpan>, String> {
    let mut spans = vec![];
    let mut begin = Lsn(0);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (f.next(), f.next()) else {
            return Err(format!("line {}: expected \"timeline LSN reason\"", i + 1));
        };
        let tli: u32 = tli
            .parse()
            .map_err(|_| format!("line {}: bad timeline {tli:?}", i + 1))?;
        let end: Lsn = lsn.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
        if spans
            .last()
            .is_some_and(|s: &TimelineSpan| s.timeline >= tli)
            || end < begin
        {
            return Err(format!("line {}: timelines out of order", i + 1));
        }
        spans.push(TimelineSpan {
            timeline: tli,
            begin,
            end: Some(end),
        });
        begin = end;
    }
    if spans.last().is_some_and(|s| s.timeline >= timeline) {
        return Err(format!(
            "lists timeline {timeline} or later as its own parent"
        ));
    }
    spans.push(TimelineSpan {
        timeline,
        begin,
        end: None,
    });
    Ok(spans)
}

/// The span of `timeline` within a path, if the path goes through it.
pub fn span_of(path: &[TimelineSpan], timeline: u32) -> Option<TimelineSpan> {
    path.iter().copied().find(|s| s.timeline == timeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_through_two_branches() {
        let text = "1\t0/A009F18\tbefore 2026-11-01 14:30:00+00\n\n2\t0/C000000\tno recovery target specified\n";
        let p = parse_history(3, text).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].timeline, 1);
        assert_eq!(p[0].end, Some("0/A009F18".parse().unwrap()));
        assert_eq!(p[1].begin, "0/A009F18".parse().unwrap());
        assert_eq!(p[2].timeline, 3);
        assert_eq!(p[2].end, None);
        assert_eq!(span_of(&p, 2).unwrap().end, Some(Lsn(0xC00_0000)));
        assert!(parse_history(1, text).is_err());
        assert!(parse_history(3, "x y").is_err());
        assert_eq!(parse_history(1, "").unwrap().len(), 1);
    }
}
