use jitdelta_format::*;
fn main() {
    let bytes = std::fs::read("/work/main/testdata-cache/minilm-bf16/model.safetensors").unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.jd");
    let mut w = JdWriter::create(&p).unwrap();
    let s = w.add_shard("m", None);
    let mut names = vec![];
    let mut total = 0;
    for (n, v) in st.tensors() {
        if v.shape().len() == 2 && v.dtype() == safetensors::Dtype::BF16 {
            w.add_tensor(
                &n,
                "BF16",
                &v.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
                s,
                v.data(),
                &EncodeOptions {
                    base: BaseKind::Bitplane,
                    ..Default::default()
                },
            )
            .unwrap();
            names.push((n, v.data().len()));
            total += v.data().len();
        }
    }
    w.finish().unwrap();
    let jd = JdFile::open(&p).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mode = std::env::args().nth(1).unwrap_or("exact".into());
    let mut outs: Vec<Vec<u8>> = names.iter().map(|n| vec![0u8; n.1]).collect();
    let cpu0 = cpu();
    let t = std::time::Instant::now();
    let iters = 20;
    pool.install(|| {
        for _ in 0..iters {
            for ((n, _), o) in names.iter().zip(&mut outs) {
                let tv = jd.tensor(n).unwrap();
                match mode.as_str() {
                    "exact" => tv.decode_exact_into(o).unwrap(),
                    "draft" => {
                        tv.decode_draft(DraftDtype::BF16).unwrap();
                    }
                    "resident" => {
                        tv.to_resident(3).unwrap();
                    }
                    _ => {
                        let mut w = JdWriter::create(dir.path().join("b.jd")).unwrap();
                        let s = w.add_shard("m", None);
                        w.add_tensor(
                            n,
                            "BF16",
                            &tv.entry().shape,
                            s,
                            o,
                            &EncodeOptions {
                                base: BaseKind::Bitplane,
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    }
                }
            }
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let c = cpu() - cpu0;
    println!(
        "{mode}: {:.0} MB/s wall, {:.0} MB/s per cpu-second",
        (total * iters) as f64 / secs / 1e6,
        (total * iters) as f64 / c / 1e6
    );
}

fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}
