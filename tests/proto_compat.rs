//! Guards the wire contract: `proto/tether/v1/fields.lock` lists every
//! field of tether.v1 with its number and type. Renaming, renumbering,
//! retyping or removing a listed field fails this test; a new field fails
//! it until it is appended to the lock file, so every change is deliberate.
//! `TETHER_WRITE_FIELDS_LOCK=1 cargo test --test proto_compat` rewrites the
//! lock from the current .proto files (review the diff before committing).

use prost::Message;
use prost_types::FileDescriptorSet;

fn current_fields() -> Vec<String> {
    let set =
        FileDescriptorSet::decode(tether::proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut lines = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "tether.v1") {
        for message in &file.message_type {
            for field in &message.field {
                let kind = match field.type_name() {
                    "" => format!("{:?}", field.r#type()),
                    name => name.to_owned(),
                };
                lines.push(format!(
                    "{}.{} = {} {kind}",
                    message.name(),
                    field.name(),
                    field.number()
                ));
            }
        }
        for enumeration in &file.enum_type {
            for value in &enumeration.value {
                lines.push(format!(
                    "{}.{} = {}",
                    enumeration.name(),
                    value.name(),
                    value.number()
                ));
            }
        }
        for service in &file.service {
            for method in &service.method {
                lines.push(format!(
                    "{}.{}({}) -> {}",
                    service.name(),
                    method.name(),
                    method.input_type(),
                    method.output_type()
                ));
            }
        }
    }
    lines.sort();
    lines
}

#[test]
fn every_locked_field_keeps_its_name_number_and_type() {
    let lock_path = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/tether/v1/fields.lock");
    if std::env::var_os("TETHER_WRITE_FIELDS_LOCK").is_some() {
        let header = "# Every field of tether.v1: see tests/proto_compat.rs.\n";
        std::fs::write(
            lock_path,
            header.to_owned() + &current_fields().join("\n") + "\n",
        )
        .unwrap();
    }
    let locked: Vec<String> = std::fs::read_to_string(lock_path)
        .expect("fields.lock")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let current = current_fields();
    let missing: Vec<&String> = locked.iter().filter(|l| !current.contains(l)).collect();
    assert!(
        missing.is_empty(),
        "changed or removed (breaks tether.v1 clients): {missing:#?}"
    );
    let new: Vec<&String> = current.iter().filter(|l| !locked.contains(l)).collect();
    assert!(
        new.is_empty(),
        "new fields: append them to proto/tether/v1/fields.lock: {new:#?}"
    );
}
