//! hot_path: cost of one request with a warm token, over a trivial inner service, side by side
//! with the bare service, tower-http's static header, and a mutex-guarded cache.
//!
//! contention: the same variants driven by 2, 8 and 64 tasks on a 2-worker runtime.

mod common;

use std::time::{Duration, Instant};

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tower::{Service, ServiceExt};

fn hot_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut variants = runtime.block_on(Variants::warm());
    let _context = runtime.enter();
    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("a_bare", |b| {
        b.iter_batched(
            request,
            |r| call_now(&mut variants.bare, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("b_static_header", |b| {
        b.iter_batched(
            request,
            |r| call_now(&mut variants.static_header, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("c_mutex_cache", |b| {
        b.iter_batched(
            request,
            |r| call_now(&mut variants.mutex_cache, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("d_ours", |b| {
        b.iter_batched(
            request,
            |r| call_now(&mut variants.ours, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("e_ours_with_retry", |b| {
        b.iter_batched(
            request,
            |r| call_now(&mut variants.ours_with_retry, r),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
    assert_eq!(
        variants.server.token_requests(),
        1,
        "the warm path never fetched"
    );
}

async fn drive<S>(service: S, tasks: usize, iters: u64) -> Duration
where
    S: Service<Req, Response = Res> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    let per_task = iters.div_ceil(tasks as u64);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let mut service = service.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let service = service.ready().await.unwrap();
                std::hint::black_box(service.call(request()).await.unwrap());
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    // Report per requested iteration so widths compare.
    start
        .elapsed()
        .mul_f64(iters as f64 / (per_task * tasks as u64) as f64)
}

fn contention(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let variants = runtime.block_on(Variants::warm());
    let mut group = c.benchmark_group("contention");
    group.throughput(Throughput::Elements(1));
    for tasks in [2usize, 8, 64] {
        macro_rules! variant {
            ($name:literal, $service:expr) => {
                group.bench_with_input(BenchmarkId::new($name, tasks), &tasks, |b, &tasks| {
                    b.iter_custom(|iters| runtime.block_on(drive($service.clone(), tasks, iters)))
                });
            };
        }
        variant!("a_bare", variants.bare);
        variant!("b_static_header", variants.static_header);
        variant!("c_mutex_cache", variants.mutex_cache);
        variant!("d_ours", variants.ours);
        variant!("e_ours_with_retry", variants.ours_with_retry);
    }
    group.finish();
    assert_eq!(
        variants.server.token_requests(),
        1,
        "the warm path never fetched"
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = hot_path, contention
}
criterion_main!(benches);
