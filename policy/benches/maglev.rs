//! Maglev table generation against the design target (DESIGN.md §7: a table for M = 16381
//! and 100 backends in ≤ 1 ms; the paper: 1.8 ms for M = 65537): `build/16381x100`, and
//! the larger Cilium sizes for comparison (`65521x100`, `65521x1000`).
//!
//! Run: `cargo bench -p membrane-policy --bench maglev` (add `-- --quick` for a short run).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use membrane_policy::service::maglev::{MaglevBackend, MaglevConfig, build_table};

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}:8080/TCP", i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    for (m, n) in [(16381u32, 100usize), (65521, 100), (65521, 1000)] {
        let names = names(n);
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .map(|name| MaglevBackend { name, weight: 1 })
            .collect();
        let config = MaglevConfig::new(m, "JLfvgnHc2kaSUFaI").expect("config");
        group.bench_function(format!("{m}x{n}"), |b| {
            b.iter(|| build_table(black_box(&backends), &config).expect("table"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
