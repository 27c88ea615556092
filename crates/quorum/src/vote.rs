//! Counting votes: group children whose answers are equal into versions and
//! pick the winner, with qemu's order.
//!
//! qemu keeps versions in a list where each new version goes to the head,
//! and each version's voters likewise; the winner is the first version in
//! that list with the strictly highest count. So on a tie the version first
//! seen last wins, and events about losers come out newest version first.
//! We reproduce that order so the same inputs give the same answers.

/// Children (by index) that gave the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    /// The child whose answer first created this version.
    pub first: usize,
    /// Every voter, the last one counted first (qemu's list order).
    pub voters: Vec<usize>,
}

/// Group `items` (child indexes, in the order they are counted) into
/// versions by `same`, which must be an equivalence. The result is in
/// qemu's list order: the version created last comes first.
pub(crate) fn tally(items: &[usize], same: impl Fn(usize, usize) -> bool) -> Vec<Version> {
    let mut versions: Vec<Version> = Vec::new();
    for &i in items {
        match versions.iter_mut().find(|v| same(v.first, i)) {
            Some(v) => v.voters.push(i),
            None => versions.push(Version {
                first: i,
                voters: vec![i],
            }),
        }
    }
    versions.reverse();
    for v in &mut versions {
        v.voters.reverse();
    }
    versions
}

/// Position in `versions` of the winner: the first with the most votes.
pub(crate) fn winner(versions: &[Version]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (pos, v) in versions.iter().enumerate() {
        if best.is_none_or(|(_, n)| v.voters.len() > n) {
            best = Some((pos, v.voters.len()));
        }
    }
    best.map(|(pos, _)| pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tally_groups_equal_answers_newest_version_first() {
        let answers = [7, 9, 7, 9, 9];
        let v = tally(&[0, 1, 2, 3, 4], |a, b| answers[a] == answers[b]);
        assert_eq!(
            v,
            vec![
                Version {
                    first: 1,
                    voters: vec![4, 3, 1]
                },
                Version {
                    first: 0,
                    voters: vec![2, 0]
                },
            ]
        );
        assert_eq!(winner(&v), Some(0));
    }

    #[test]
    fn test_winner_on_tie_is_version_seen_last() {
        let answers = [1, 2];
        let v = tally(&[0, 1], |a, b| answers[a] == answers[b]);
        let w = winner(&v).unwrap();
        assert_eq!(v[w].first, 1);
    }

    #[test]
    fn test_winner_of_nothing_is_none() {
        assert_eq!(winner(&tally(&[], |_, _| true)), None);
    }

    #[test]
    fn test_tally_skips_uncounted_children() {
        let v = tally(&[0, 2], |_, _| true);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].voters, vec![2, 0]);
    }
}
