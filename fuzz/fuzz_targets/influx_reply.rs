//! What an InfluxDB 1.x server sends back. The first byte picks the reply:
//! 0 a `MetastoreBackup` reply (then its `meta.Data` decoded, its shards listed, one
//! database cut out as a restore does), 1 a `DatabaseInfo` shard list (each path split),
//! 2 a `MetaStoreUpdate` reply, 3 an HTTP `/query` answer (counts summed as a backup does),
//! 4 a tombstone file (series keys split), 5 a bare `meta.Data`.
#![no_main]

use std::collections::BTreeMap;

use backupd::source::influx::{http, meta, rpc, tombstone};
use libfuzzer_sys::fuzz_target;

fn metastore(b: &[u8]) {
    let Ok(d) = meta::Data::parse(b) else {
        return;
    };
    for db in &d.databases {
        let _ = db.all_shards().count();
        let _ = db.shards().count();
        if let Some(cut) = d.only_database(&db.name) {
            let again = meta::Data::parse(&cut).expect("a cut metastore decodes");
            assert_eq!(again.databases.len(), 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        0 => {
            if let Ok(m) = rpc::read_metastore_reply(&mut &rest[..]) {
                metastore(&m.data);
                let _ = serde_json::from_slice::<serde_json::Value>(&m.node);
            }
        }
        1 => {
            if let Ok(paths) = rpc::parse_shard_list(rest) {
                for p in &paths {
                    let _ = rpc::parse_shard_path(p);
                }
            }
        }
        2 => {
            let _ = rpc::read_update_reply(&mut &rest[..]);
        }
        3 => {
            if let Ok(series) = http::parse_answer(rest) {
                let mut fields = BTreeMap::new();
                for s in &series {
                    http::add_counts(s, &mut fields);
                }
            }
        }
        4 => {
            if let Ok(deletions) = tombstone::parse(rest) {
                for d in &deletions {
                    let _ = tombstone::split_series(&d.series);
                }
            }
        }
        _ => metastore(rest),
    }
});
