//! A Modbus unit answering anything for any point: decoding never panics, and every value a
//! point accepts for writing reads back as exactly that value and encodes to the same registers
//! again, for every type and scale (a value no registers read back as, such as 72.1 in an f32
//! or 7.66e-42 at scale 0.001, is refused; `regressions/modbus_response/` keeps the inputs that
//! found the scaled-f32 case).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::equipment::modbus::{Point, PointSpec};
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let tables = ["coil", "discrete_input", "holding", "input"];
    let types = ["bool", "u16", "i16", "u32", "i32", "f32"];
    let table = tables[usize::from(data[0]) % tables.len()];
    let ty = types[usize::from(data[1]) % types.len()];
    let order = if data[2] & 1 == 0 { "big" } else { "little" };
    let scales = [1.0, 0.1, 0.01, 10.0, 0.5, -1.0, 1e-3];
    let scale = scales[usize::from(data[3]) % scales.len()];
    let address = u16::from_le_bytes([data[4], data[5]]);
    let spec = json!({"table": table, "address": address, "type": ty, "word_order": order, "scale": scale});
    let Ok(spec) = serde_json::from_value::<PointSpec>(spec) else { return };
    let Ok(point) = Point::new(&spec) else { return };
    let value = f64::from_le_bytes(data[6..14.min(data.len())].try_into().unwrap_or([0; 8]));
    let words: Vec<u16> = data[12..].chunks(2).map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect();
    let _ = point.decode_response(&words);
    let v = if ty == "bool" { json!(value > 0.0) } else { json!(value) };
    if let Ok(raw) = point.encode(&v) {
        let back = point.decode_response(&raw).expect("encoded registers decode");
        if ty != "bool" {
            assert_eq!(back.as_f64(), v.as_f64().map(|x| if x == 0.0 { 0.0 } else { x }), "{v} reads back as {back}");
        }
        assert_eq!(point.encode(&back).ok(), Some(raw), "{v} -> {back}");
    }
});
