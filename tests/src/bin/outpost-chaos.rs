//! `outpost-chaos`: the long chaos suite. Runs the real `outpost` and `outpost-cloud` binaries
//! built next to it and prints what each part did and found; exits 1 if any invariant failed.

use std::process::ExitCode;

use outpost_tests::chaos::{self, Broker, Report};

const HELP: &str = "\
outpost-chaos: SIGKILLs, fault storms, a full disk and hostile inputs against real processes

USAGE:
    cargo build --release -p outpost-agent -p outpost-cloud-sync --features outpost-cloud-sync/fault-injection
    cargo run --release -p outpost-tests --bin outpost-chaos -- [OPTIONS]

OPTIONS:
    --parts LIST     kills,drain,disk,hostile (default: all)
    --kills N        SIGKILLs of the agent in the kills part (default: 1000)
    --events N       events to drain per broker in the drain part (default: 1000000)
    --brokers LIST   embedded,mosquitto (default: both; mosquitto must be installed)
    --seed N         random seed (default: 1)
    --keep           keep the work directory (kept anyway when a part fails)
    --json           print the reports as JSON lines too
    -h, --help       this text

The binaries are looked up next to this one (target/release/); build them first as shown.
The full-disk part needs outpost-cloud built with the fault-injection feature.";

struct Options {
    parts: Vec<String>,
    kills: usize,
    events: u64,
    brokers: Vec<Broker>,
    seed: u64,
    keep: bool,
    json: bool,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        parts: ["kills", "drain", "disk", "hostile"].map(String::from).to_vec(),
        kills: 1000,
        events: 1_000_000,
        brokers: vec![Broker::Embedded, Broker::Mosquitto],
        seed: 1,
        keep: false,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--parts" => o.parts = value("--parts")?.split(',').map(str::to_string).collect(),
            "--kills" => o.kills = value("--kills")?.parse().map_err(|e| format!("--kills: {e}"))?,
            "--events" => o.events = value("--events")?.parse().map_err(|e| format!("--events: {e}"))?,
            "--seed" => o.seed = value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--brokers" => {
                o.brokers = value("--brokers")?
                    .split(',')
                    .map(|b| match b {
                        "embedded" => Ok(Broker::Embedded),
                        "mosquitto" => Ok(Broker::Mosquitto),
                        other => Err(format!("--brokers: unknown broker '{other}' (embedded, mosquitto)")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--keep" => o.keep = true,
            "--json" => o.json = true,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    for p in &o.parts {
        if !["kills", "drain", "disk", "hostile"].contains(&p.as_str()) {
            return Err(format!("--parts: unknown part '{p}' (kills, drain, disk, hostile)"));
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("outpost-chaos: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let work = match tempfile::Builder::new().prefix("outpost-chaos-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("outpost-chaos: cannot make a work directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("outpost-chaos: work directory {}", work.path().display());
    let mut reports: Vec<Report> = Vec::new();
    let mut run = |name: &str, f: &dyn Fn(&std::path::Path) -> Report| {
        let dir = work.path().join(name);
        let _ = std::fs::create_dir_all(&dir);
        eprintln!("-- {name} …");
        let r = f(&dir);
        println!("{r}");
        if o.json {
            println!("{}", chaos::to_json(&r));
        }
        reports.push(r);
    };
    for part in &o.parts {
        match part.as_str() {
            "kills" => run("kills", &|d| chaos::kills(d, o.kills, o.seed)),
            "drain" => {
                for b in &o.brokers {
                    let name = format!("drain-{b:?}").to_lowercase();
                    run(&name, &|d| chaos::drain(d, o.events, *b, o.seed));
                }
            }
            "disk" => run("disk", &|d| chaos::full_disk(d, 20)),
            _ => run("hostile", &chaos::hostile),
        }
    }
    let failed = reports.iter().filter(|r| !r.passed()).count();
    println!("outpost-chaos: {} parts, {failed} failed", reports.len());
    if failed > 0 || o.keep {
        let kept = work.keep();
        println!("outpost-chaos: work directory kept at {}", kept.display());
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
