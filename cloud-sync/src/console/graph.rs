//! The workflow graph of a run: steps laid out in layers from the start, drawn as SVG with each
//! step coloured by the state its history gives it. Pure: definition + history in, markup out.

use std::collections::{BTreeMap, HashMap};

use maud::{Markup, html};
use outpost_shared::definition::{Definition, Document, Kind};
use outpost_shared::run::{CompensationStatus, RunState};

/// Every class a step can have on the graph, in the legend's order: the step's status as the
/// agent's `show` names it, or its compensation's once the run is undoing.
pub const LEGEND: [&str; 14] = [
    "pending",
    "running",
    "retrying",
    "sleeping",
    "waiting",
    "timed_out",
    "completed",
    "failed",
    "skipped",
    "cancelled",
    "not_run",
    "compensating",
    "compensated",
    "compensation_failed",
];

/// Legend entries shown even when no step has them.
pub const ALWAYS_IN_LEGEND: [&str; 5] = ["pending", "running", "waiting", "completed", "failed"];

/// The class of every step: the one fold of the run (`outpost_shared::run`), so the graph says
/// what the agent's `show` says.
pub fn step_classes(def: &Definition, st: &RunState) -> HashMap<String, &'static str> {
    def.doc
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let class = match st.compensation_status(i) {
                Some((CompensationStatus::Compensated, _)) => "compensated",
                Some((CompensationStatus::Failed, _)) => "compensation_failed",
                Some((CompensationStatus::Compensating | CompensationStatus::Pending, _)) => "compensating",
                None => st.step_status(i).as_str(),
            };
            (step.id.clone(), class)
        })
        .collect()
}

/// An edge between step indices, with an optional label (a choice's condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// Source step index.
    pub from: usize,
    /// Target step index.
    pub to: usize,
    /// Shown beside the edge.
    pub label: Option<String>,
}

/// Step positions: (layer, row) per step index, and the edges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// (layer, row) of each step, by index.
    pub places: Vec<(usize, usize)>,
    /// Edges.
    pub edges: Vec<Edge>,
}

/// Lays the steps out left to right: a DAG by longest path from its roots, a state machine by
/// shortest distance from its start (loops become edges that point back).
pub fn layout(doc: &Document) -> Layout {
    let index: HashMap<&str, usize> = doc.steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let n = doc.steps.len();
    let mut edges = Vec::new();
    let mut layer = vec![0usize; n];
    match doc.kind {
        Kind::Dag => {
            for (i, s) in doc.steps.iter().enumerate() {
                for d in &s.depends_on {
                    if let Some(&from) = index.get(d.as_str()) {
                        edges.push(Edge {
                            from,
                            to: i,
                            label: s.when.clone(),
                        });
                    }
                }
            }
            // Longest path by relaxation; validated DAGs have no cycles, and the bound keeps a
            // malformed one from looping.
            for _ in 0..n {
                let mut moved = false;
                for e in &edges {
                    if layer[e.to] < layer[e.from] + 1 {
                        layer[e.to] = layer[e.from] + 1;
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        Kind::StateMachine => {
            for (i, s) in doc.steps.iter().enumerate() {
                let mut add = |to: &str, label: Option<String>| {
                    if let Some(&to) = index.get(to) {
                        edges.push(Edge { from: i, to, label });
                    }
                };
                if let Some(next) = &s.next {
                    add(next, None);
                }
                for c in &s.choices {
                    add(&c.next, Some(c.when.clone()));
                }
                if let Some(d) = &s.default {
                    add(d, Some("default".into()));
                }
            }
            let start = doc.start.as_deref().and_then(|s| index.get(s).copied()).unwrap_or(0);
            let mut dist = vec![usize::MAX; n];
            let mut queue = std::collections::VecDeque::new();
            if n > 0 {
                dist[start] = 0;
                queue.push_back(start);
            }
            let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
            for e in &edges {
                out[e.from].push(e.to);
            }
            while let Some(i) = queue.pop_front() {
                for &to in &out[i] {
                    if dist[to] == usize::MAX {
                        dist[to] = dist[i] + 1;
                        queue.push_back(to);
                    }
                }
            }
            // Unreachable steps go after the rest rather than on top of the start.
            let deepest = dist.iter().filter(|d| **d != usize::MAX).max().copied().unwrap_or(0);
            for (i, d) in dist.iter().enumerate() {
                layer[i] = if *d == usize::MAX { deepest + 1 } else { *d };
            }
        }
    }
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let places = layer
        .iter()
        .map(|&l| {
            let r = rows.entry(l).or_default();
            *r += 1;
            (l, *r - 1)
        })
        .collect();
    Layout { places, edges }
}

const W: usize = 168;
const H: usize = 40;
const GAP_X: usize = 64;
const GAP_Y: usize = 28;
const PAD: usize = 16;

fn xy((layer, row): (usize, usize)) -> (usize, usize) {
    (PAD + layer * (W + GAP_X), PAD + row * (H + GAP_Y))
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// Most steps a graph is drawn for: the layout is quadratic at worst and runs on the async
/// workers, and a definition from a device may hold tens of thousands of steps.
pub const MAX_GRAPH_STEPS: usize = 500;

/// The graph as inline SVG; every node carries `data-step` and `data-state`. A definition with
/// more than [`MAX_GRAPH_STEPS`] steps gets a note instead.
pub fn svg(doc: &Document, states: &HashMap<String, &'static str>) -> Markup {
    if doc.steps.len() > MAX_GRAPH_STEPS {
        return html! {
            p.note { (doc.steps.len()) " steps: too many to draw (the graph is drawn up to " (MAX_GRAPH_STEPS) "); the step table lists them." }
        };
    }
    let lay = layout(doc);
    let width = lay.places.iter().map(|p| xy(*p).0 + W).max().unwrap_or(0) + PAD;
    let height = lay.places.iter().map(|p| xy(*p).1 + H).max().unwrap_or(0) + PAD + 24;
    html! {
        svg.graph xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label={"Graph of " (doc.name)} {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead" {}
                }
            }
            @for e in &lay.edges {
                @let (fx, fy) = xy(lay.places[e.from]);
                @let (tx, ty) = xy(lay.places[e.to]);
                @if lay.places[e.to].0 > lay.places[e.from].0 {
                    @let (x1, y1, x2, y2) = (fx + W, fy + H / 2, tx, ty + H / 2);
                    @let mid = (x1 + x2) / 2;
                    path.edge d={"M " (x1) " " (y1) " C " (mid) " " (y1) ", " (mid) " " (y2) ", " (x2 - 2) " " (y2)} marker-end="url(#arrow)" {}
                    @if let Some(l) = &e.label {
                        // Beside the arrowhead, where edges from one step no longer overlap.
                        text.edge-label x=(x2 - 8) y=(y2 - 6) text-anchor="end" { title { (l) } (short(l, 18)) }
                    }
                } @else {
                    // Back (loop) or same-layer edge: an arc under the boxes.
                    @let (x1, y1, x2, y2) = (fx + W / 2, fy + H, tx + W / 2, ty + H);
                    @let dip = y1.max(y2) + GAP_Y;
                    path.edge.back d={"M " (x1) " " (y1) " C " (x1) " " (dip) ", " (x2) " " (dip) ", " (x2) " " (y2 + 2)} marker-end="url(#arrow)" {}
                    @if let Some(l) = &e.label {
                        text.edge-label x=((x1 + x2) / 2) y=(dip - 2) text-anchor="middle" { title { (l) } (short(l, 22)) }
                    }
                }
            }
            @for (i, step) in doc.steps.iter().enumerate() {
                @let (x, y) = xy(lay.places[i]);
                @let state = states.get(&step.id).copied().unwrap_or("pending");
                g class={"node " (state)} data-step=(step.id) data-state=(state) {
                    title { (step.id) " (" (step.action) "): " (state) }
                    rect x=(x) y=(y) width=(W) height=(H) rx="6" {}
                    text x=(x + 10) y=(y + 17) class="node-id" { (short(&step.id, 20)) }
                    text x=(x + 10) y=(y + 32) class="node-action" { (short(&step.action, 14)) " · " (state) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::definition::parse_document;

    #[test]
    fn dag_layers_follow_the_longest_path_and_fan_in_waits_for_both() {
        let doc = parse_document(
            r#"{"name":"w","version":1,"steps":[
                {"id":"a","action":"set"},
                {"id":"b","action":"set","depends_on":["a"]},
                {"id":"c","action":"set","depends_on":["b"]},
                {"id":"d","action":"set","depends_on":["a","c"]}]}"#,
        )
        .unwrap();
        let l = layout(&doc);
        assert_eq!(l.places, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
        assert_eq!(l.edges.len(), 4);
    }

    #[test]
    fn a_definition_too_big_to_draw_gets_a_note_not_a_layout() {
        // A reversed chain is the relaxation's worst case: 15,000² steps of work if drawn.
        let steps: Vec<String> = (0..15_000)
            .map(|i| {
                let dep = if i + 1 < 15_000 {
                    format!(r#","depends_on":["s{}"]"#, i + 1)
                } else {
                    String::new()
                };
                format!(r#"{{"id":"s{i}","action":"set"{dep}}}"#)
            })
            .collect();
        let doc = parse_document(&format!(r#"{{"name":"w","version":1,"steps":[{}]}}"#, steps.join(","))).unwrap();
        let out = svg(&doc, &HashMap::new()).into_string();
        assert!(
            out.contains("15000 steps: too many to draw"),
            "{}",
            &out[..out.len().min(200)]
        );
    }

    #[test]
    fn state_machine_loops_point_back_and_unreachable_steps_go_last() {
        let doc = parse_document(
            r#"{"name":"w","version":1,"kind":"state_machine","steps":[
                {"id":"heat","action":"set","next":"check"},
                {"id":"check","action":"set","choices":[{"when":"steps.check.output.hot","next":"done"}],"default":"heat"},
                {"id":"done","action":"set","end":"succeed"},
                {"id":"orphan","action":"set","end":"fail"}]}"#,
        )
        .unwrap();
        let l = layout(&doc);
        assert_eq!(l.places[0], (0, 0));
        assert_eq!(l.places[1], (1, 0));
        assert_eq!(l.places[2], (2, 0));
        assert_eq!(l.places[3].0, 3);
        assert!(
            l.edges
                .iter()
                .any(|e| e.from == 1 && e.to == 0 && e.label.as_deref() == Some("default"))
        );
    }

    #[test]
    fn a_step_is_coloured_by_the_one_fold_of_its_run() {
        use outpost_shared::journal::{ErrorInfo, Event, Record};
        let rec = |event| Record {
            run_id: "r".into(),
            at_ms: 1,
            event,
        };
        let h = vec![
            (
                0,
                rec(Event::RunStarted {
                    workflow: "w".into(),
                    version: 1,
                    input: "{}".into(),
                }),
            ),
            (
                1,
                rec(Event::AttemptStarted {
                    step: "a".into(),
                    visit: 1,
                    attempt: 1,
                    key: "k".into(),
                }),
            ),
            (
                2,
                rec(Event::AttemptFailed {
                    step: "a".into(),
                    visit: 1,
                    attempt: 1,
                    error: ErrorInfo::new("x", "y"),
                    retry_at_ms: Some(5),
                }),
            ),
            (
                3,
                rec(Event::WaitStarted {
                    step: "gate".into(),
                    visit: 1,
                    signal: "approval:gate".into(),
                    fire_at_ms: None,
                    duration_ms: 0,
                }),
            ),
        ];
        let doc = parse_document(
            r#"{"name":"w","version":1,"steps":[{"id":"a","action":"set"},{"id":"gate","action":"approval","depends_on":["a"]},{"id":"<b>","action":"set"}]}"#,
        )
        .unwrap();
        let (def, st) = outpost_shared::run::fold_mirrored("w", 1, Some(&doc), "r", &h).unwrap();
        let s = step_classes(&def, &st);
        assert_eq!(s["a"], "retrying");
        assert_eq!(s["gate"], "waiting");
        let out = svg(&doc, &s).into_string();
        assert!(out.contains(r#"data-step="gate" data-state="waiting""#), "{out}");
        assert!(
            out.contains("&lt;b&gt;") && !out.contains("<b>"),
            "step ids are escaped"
        );
    }
}
