//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), the way
//! Cilium builds its per-Service tables: a table of prime size M where every backend
//! owns about M/N entries, filled by each backend in turn taking the next free entry
//! of its own permutation (offset + j * skip mod M). Removing one backend of N moves
//! only about 1/N of the entries, so flows to the other backends keep their backend
//! even when another node (building the same table) receives them.
use sha2::{Digest, Sha256};

/// Entries per Service table: prime, and large enough that 100 backends still get
/// shares within 1% of each other (Cilium's default too).
pub const DEFAULT_TABLE_SIZE: usize = 16381;

#[derive(Debug, PartialEq, Eq)]
pub enum TableError {
    /// The size must be prime for every skip to visit every entry.
    NotPrime(usize),
    /// More backends than entries: some would own none.
    TooManyBackends { backends: usize, size: usize },
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotPrime(size) => write!(f, "Maglev table size {size} is not prime"),
            Self::TooManyBackends { backends, size } => {
                write!(f, "{backends} backends do not fit a table of {size}")
            }
        }
    }
}

pub fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// (offset, skip) of a backend: two independent hashes of its key (the two halves of
/// one SHA-256, so every node computes the same table).
fn permutation(key: &[u8], size: u64) -> (u64, u64) {
    let digest = Sha256::digest(key);
    let half = |i: usize| u64::from_le_bytes(digest[i..i + 8].try_into().expect("8 bytes"));
    (half(0) % size, half(8) % (size - 1) + 1)
}

/// The lookup table: entry `i` holds the index (into `backends`) of the backend that
/// owns it. Backends are identified by a stable key (e.g. address and port) and
/// filled in key order, so the table does not depend on the order the API listed
/// them in. Unweighted: shares differ by at most one entry. No backends: an empty
/// table. Errors if `size` is not prime or is smaller than the number of backends.
pub fn table<K: AsRef<[u8]>>(backends: &[K], size: usize) -> Result<Vec<u32>, TableError> {
    if !is_prime(size) {
        return Err(TableError::NotPrime(size));
    }
    if backends.len() > size {
        return Err(TableError::TooManyBackends {
            backends: backends.len(),
            size,
        });
    }
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    // Fill in key order so that every node, whatever order its API list came in,
    // builds the same table.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|a, b| backends[*a].as_ref().cmp(backends[*b].as_ref()));
    let m = size as u64;
    let permutations: Vec<(u64, u64)> = order
        .iter()
        .map(|i| permutation(backends[*i].as_ref(), m))
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut entries = vec![u32::MAX; size];
    let mut filled = 0;
    loop {
        for (position, &(offset, skip)) in permutations.iter().enumerate() {
            let mut entry = ((offset + next[position] * skip) % m) as usize;
            while entries[entry] != u32::MAX {
                next[position] += 1;
                entry = ((offset + next[position] * skip) % m) as usize;
            }
            entries[entry] = order[position] as u32;
            next[position] += 1;
            filled += 1;
            if filled == size {
                return Ok(entries);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 250, i % 250))
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &owner in table {
            counts[owner as usize] += 1;
        }
        counts
    }

    #[test]
    fn every_backend_owns_an_equal_share_within_one_entry() {
        for n in [1, 3, 10, 100] {
            let counts = shares(&table(&backends(n), DEFAULT_TABLE_SIZE).unwrap(), n);
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: {min}..{max}");
            assert_eq!(counts.iter().sum::<usize>(), DEFAULT_TABLE_SIZE);
        }
    }

    /// Entries whose backend changed, between tables over `before` and `after`.
    fn moved(before: &[String], after: &[String]) -> f64 {
        let (a, b) = (
            table(before, DEFAULT_TABLE_SIZE).unwrap(),
            table(after, DEFAULT_TABLE_SIZE).unwrap(),
        );
        let changed = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| before[**x as usize] != after[**y as usize])
            .count();
        changed as f64 / DEFAULT_TABLE_SIZE as f64
    }

    #[test]
    fn removing_or_adding_one_backend_moves_about_one_nth_of_the_entries() {
        // The removed backend's own 1/n must move. Maglev moves some entries of
        // surviving backends too (the paper's section 5.3), more as M/n shrinks:
        // measured 0.1077 = 1.08/n at n=10 (126 of 1764 moved entries were a
        // survivor's) and 0.0235 = 2.35/n at n=100 (221 of 385) with M=16381
        // (0.0156 with M=65537), so 1.5/n holds only for the smaller n.
        for (n, bound) in [(10, 1.5), (100, 2.5)] {
            let all = backends(n);
            let mut fewer = all.clone();
            fewer.remove(n / 2);
            for fraction in [moved(&all, &fewer), moved(&fewer, &all)] {
                assert!(fraction >= 0.99 / n as f64, "n={n}: {fraction}");
                assert!(fraction <= bound / n as f64, "n={n}: {fraction}");
            }
        }
    }

    #[test]
    fn the_table_does_not_depend_on_backend_order() {
        let forward = backends(20);
        let mut reversed = forward.clone();
        reversed.reverse();
        let (a, b) = (
            table(&forward, DEFAULT_TABLE_SIZE).unwrap(),
            table(&reversed, DEFAULT_TABLE_SIZE).unwrap(),
        );
        let owners = |t: &[u32], keys: &[String]| -> Vec<String> {
            t.iter().map(|i| keys[*i as usize].clone()).collect()
        };
        assert_eq!(owners(&a, &forward), owners(&b, &reversed));
    }

    /// Every node, and every agent version in a rolling upgrade, must build the same
    /// table: pin the start of one so a change of hash or fill order shows here.
    #[test]
    fn the_table_is_the_same_on_every_run_and_node() {
        let keys = backends(100);
        let first = table(&keys, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(first[..8], [30, 78, 90, 23, 59, 69, 57, 31]);
        assert_eq!(first, table(&keys, DEFAULT_TABLE_SIZE).unwrap());
    }

    #[test]
    fn sizes_must_be_prime_and_hold_every_backend() {
        assert_eq!(table(&backends(3), 16380), Err(TableError::NotPrime(16380)));
        assert_eq!(
            table(&backends(8), 7),
            Err(TableError::TooManyBackends {
                backends: 8,
                size: 7
            })
        );
        assert_eq!(table::<String>(&[], 7), Ok(Vec::new()));
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(2) && !is_prime(1));
    }
}
