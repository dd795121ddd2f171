//! The database records its schema version, and a database written with
//! another version is refused with a clear error without being modified.

mod common;

use redb::{ReadableDatabase, TableDefinition, TableHandle};
use sandtree_branching::{Policy, Tree, TreeError, SCHEMA_VERSION};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn stored_version(path: &std::path::Path) -> Option<u64> {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    meta.get("schema_version").unwrap().map(|g| g.value())
}

#[test]
fn new_database_records_schema_version_1() {
    assert_eq!(SCHEMA_VERSION, 1);
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    drop(Tree::open(&path).unwrap());
    assert_eq!(stored_version(&path), Some(1));
}

#[test]
fn reopening_keeps_data() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    let id = {
        let tree = Tree::open(&path).unwrap();
        tree.create_episode("img", Policy::Full, vec![]).unwrap().id
    };
    let tree = Tree::open(&path).unwrap();
    let ep = tree.episode(&id).unwrap();
    assert_eq!(ep.policy, Policy::Full);
    // Counters survive too: a new episode gets fresh ids.
    let other = tree.create_episode("img", Policy::Full, vec![]).unwrap();
    assert_ne!(other.head, ep.head);
    assert_ne!(
        tree.turn(&other.id, 0).unwrap().node,
        tree.turn(&id, 0).unwrap().node
    );
}

#[test]
fn mismatched_schema_version_is_refused_clearly_and_untouched() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", 7)
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Tree::open(&path).unwrap_err();
    match err {
        TreeError::SchemaMismatch { found, expected } => assert_eq!((found, expected), (7, 1)),
        ref other => panic!("expected SchemaMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 7") && msg.contains("expects 1"),
        "{msg}"
    );
    // The refused database was not modified: no tables were added.
    assert_eq!(stored_version(&path), Some(7));
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let tables: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    assert_eq!(tables, vec!["meta".to_owned()]);
}

#[test]
fn data_without_schema_version_is_refused() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let nodes: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");
        txn.open_table(nodes)
            .unwrap()
            .insert(1, b"{}".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    assert!(matches!(Tree::open(&path), Err(TreeError::Corrupt(_))));
}

#[test]
fn a_file_that_is_not_a_database_is_a_storage_error() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    std::fs::write(&path, b"definitely not a redb file, just some bytes").unwrap();
    let err = Tree::open(&path).unwrap_err();
    assert!(matches!(err, TreeError::Storage(_)), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
}
