//! Who owns an entitlement: rendezvous (highest-random-weight) hashing
//! over the live members. Each member scores every entitlement id with a
//! stable 64-bit hash of (member id, entitlement id); the highest score
//! owns it. Every node computes the same owner from the same members, with
//! no ring to build, and a member joining or leaving moves only the
//! entitlements it gains or held (about 1/N of them), as a consistent-hash
//! ring with many virtual nodes would, without the virtual nodes.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The score of `member` for entitlement `id`; the hash is XXH3, fixed by
/// its specification, so that nodes of different builds agree.
fn score(member: &str, id: &str) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), xxh3_64_with_seed(member.as_bytes(), 0))
}

/// The owner of `id` among `members` (their ids); `None` when there are none.
pub fn owner<'a, I>(members: I, id: &str) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    members
        .into_iter()
        // Ties (never seen with 64-bit scores) go to the greater member id,
        // so that every node breaks them alike.
        .max_by(|a, b| score(a, id).cmp(&score(b, id)).then_with(|| a.cmp(b)))
}

/// How many sample ids [`shares`] estimates over.
pub const SAMPLE: usize = 4_096;

/// Each member's share of the entitlements, estimated as the fraction of
/// [`SAMPLE`] fixed sample ids it owns (in the order of `members`).
pub fn shares(members: &[&str]) -> Vec<f64> {
    let mut owned = vec![0usize; members.len()];
    for n in 0..SAMPLE {
        let id = format!("sample-{n}");
        if let Some(o) = owner(members.iter().copied(), &id)
            && let Some(i) = members.iter().position(|m| *m == o)
        {
            owned[i] += 1;
        }
    }
    owned.iter().map(|&k| k as f64 / SAMPLE as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cust-{i}")).collect()
    }

    #[test]
    fn every_node_computes_the_same_owner_whatever_the_order() {
        let a = ["n-a", "n-b", "n-c"];
        let b = ["n-c", "n-a", "n-b"];
        for id in ids(1_000) {
            assert_eq!(owner(a, &id), owner(b, &id), "{id}");
        }
        assert_eq!(owner([], "x"), None);
    }

    #[test]
    fn the_owners_are_spread_evenly() {
        let members = ["n-a", "n-b", "n-c"];
        for share in shares(&members) {
            assert!((0.30..0.37).contains(&share), "{share}");
        }
    }

    #[test]
    fn a_member_joining_takes_only_what_it_gains_and_leaving_moves_only_its_own() {
        let before = ["n-a", "n-b", "n-c"];
        let after = ["n-a", "n-b", "n-c", "n-d"];
        let mut moved = 0;
        for id in ids(10_000) {
            let (o1, o2) = (owner(before, &id), owner(after, &id));
            if o1 != o2 {
                assert_eq!(o2, Some("n-d"), "{id} moved between old members");
                moved += 1;
            }
        }
        // About a quarter moves to the new member, nothing else.
        assert!((2_200..2_800).contains(&moved), "{moved}");
    }

    #[test]
    fn the_scores_are_fixed_across_builds() {
        // XXH3 is specified: the same on every platform and build. The
        // value was checked against Python's `xxhash` package:
        // xxh3_64_intdigest(b"acme", seed=xxh3_64_intdigest(b"n-a", seed=0)).
        assert_eq!(score("n-a", "acme"), 15_248_614_719_258_747_599);
        let owners =
            ["acme", "cust-1", "cust-2", "cust-3"].map(|id| owner(["n-a", "n-b", "n-c"], id));
        assert_eq!(owners, [Some("n-b"), Some("n-b"), Some("n-b"), Some("n-a")]);
    }
}
