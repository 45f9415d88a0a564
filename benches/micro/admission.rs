//! The overload refusal's own work, without the network: `Admission::admit` past the
//! in-flight bound (no queue), and the RESOURCE_EXHAUSTED status with its details turned
//! into the HTTP response the gRPC front sends (issue 17: a refusal in < 1 ms).

use std::hint::black_box;

use criterion::Criterion;
use llm_gateway::server::admission::{Admission, AdmissionSettings};

pub fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    let admission = Admission::new(AdmissionSettings {
        max_in_flight: 1,
        queue: 0,
        ..AdmissionSettings::default()
    });
    let _held = rt
        .block_on(admission.admit(None))
        .expect("the first call is admitted");
    let mut g = c.benchmark_group("admission");
    g.bench_function("refuse", |b| {
        b.iter(|| {
            rt.block_on(async {
                let err = admission
                    .admit(black_box(None))
                    .await
                    .expect_err("past the bound");
                black_box(err.into_status().into_http::<tonic::body::Body>())
            })
        });
    });
    g.finish();
}
