//! The PostgreSQL catalogue a site answers for tools: the queries psql 15
//! sends for `\dt`, `\dt+`, `\d`, `\d patient`, `\d+ patient`, `\df`,
//! `\dn` and `\l` (captured with
//! `psql -E` against PostgreSQL 15, in `fixtures/psql15/`), and the
//! `information_schema` drivers read, answered from the site's own schema —
//! never SNAPS' status column or bookkeeping.

mod common;

use common::{connect, refused, run, setup};

fn query(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/psql15")
        .join(format!("{name}.sql"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psqls_catalogue_queries_describe_the_sites_own_schema() {
    let net = setup(10).await;
    let mut stg = connect(net.sites["STG"]).await;

    // \dt: every application relation, as tables of public; no bookkeeping.
    let (tables, _) = run(&mut stg, &query("dt_1")).await;
    let names: Vec<&str> = tables.iter().map(|r| r[1].as_deref().unwrap()).collect();
    for t in ["patient", "visit", "visit_rep", "doctor"] {
        assert!(names.contains(&t), "{names:?}");
    }
    assert!(names.iter().all(|n| !n.starts_with("snaps_")), "{names:?}");
    assert!(
        tables
            .iter()
            .all(|r| r[0].as_deref() == Some("public") && r[2].as_deref() == Some("table"))
    );
    let (d, _) = run(&mut stg, &query("d_1")).await;
    assert_eq!(d, tables);

    // \d patient: the oid first, then each of psql's questions about it.
    let (found, _) = run(&mut stg, &query("d_name_1")).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let oid = found[0][0].clone().unwrap();
    let at = |n: usize| query(&format!("d_name_{n}")).replace("{oid}", &oid);
    let (columns, _) = run(&mut stg, &at(3)).await;
    let pno = columns
        .iter()
        .find(|r| r[0].as_deref() == Some("pno"))
        .expect("pno");
    assert_eq!(pno[1].as_deref(), Some("integer"));
    assert_eq!(pno[3].as_deref(), Some("t"), "the key is not null");
    let surname = columns
        .iter()
        .find(|r| r[0].as_deref() == Some("surname"))
        .expect("surname");
    assert_eq!(surname[1].as_deref(), Some("character(22)"));
    assert!(
        columns
            .iter()
            .all(|r| r[0].as_deref() != Some("snaps_status")),
        "{columns:?}"
    );
    let (indexes, _) = run(&mut stg, &at(4)).await;
    assert_eq!(indexes.len(), 1, "{indexes:?}");
    assert_eq!(indexes[0][6].as_deref(), Some("PRIMARY KEY (pno)"));
    // Policies, statistics, publications, inheritance: nothing, no error.
    for n in [2, 5, 6, 7, 8, 9] {
        run(&mut stg, &at(n)).await;
    }

    // \d+ patient: the same, with storage and the rest.
    let plus = |n: usize| query(&format!("d_plus_{n}")).replace("{oid}", &oid);
    let (found_plus, _) = run(&mut stg, &query("d_plus_1")).await;
    assert_eq!(found_plus, found);
    for n in 2..=9 {
        run(&mut stg, &plus(n)).await;
    }
    let (detail, _) = run(&mut stg, &plus(3)).await;
    let surname = detail
        .iter()
        .find(|r| r[0].as_deref() == Some("surname"))
        .expect("surname");
    assert_eq!(surname[7].as_deref(), Some("x"), "text is stored extended");
    // \dt+ lists the same tables; \df lists no functions.
    let (tables_plus, _) = run(&mut stg, &query("dt_plus_1")).await;
    assert_eq!(tables_plus.len(), tables.len());
    let (functions, _) = run(&mut stg, &query("df_1")).await;
    assert!(functions.is_empty(), "{functions:?}");

    // \dn and \l.
    let (schemas, _) = run(&mut stg, &query("dn_1")).await;
    assert_eq!(
        schemas,
        vec![vec![Some("public".into()), Some("snaps".into())]]
    );
    let (databases, _) = run(&mut stg, &query("l_1")).await;
    assert_eq!(databases.len(), 1);
    assert_eq!(databases[0][0].as_deref(), Some("STG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drivers_read_information_schema_and_reals_and_unknown_questions_are_named() {
    let net = setup(10).await;
    let stg = connect(net.sites["STG"]).await;
    let rows = stg
        .client
        .query(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = 'visit_rep' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("information_schema.columns");
    let got: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("vno".into(), "integer".into(), "NO".into()),
            ("line_no".into(), "smallint".into(), "NO".into()),
            ("line".into(), "character".into(), "YES".into()),
        ]
    );
    // REALs are float8 in Describe and Execute, a column's or an
    // expression's, and read back as numbers.
    use tokio_postgres::types::Type;
    let st = stg
        .client
        .prepare("SELECT rsb_rebate FROM rsb_codes")
        .await
        .expect("prepare");
    assert_eq!(st.columns()[0].type_(), &Type::FLOAT8);
    let row = stg
        .client
        .query_one("SELECT 3.0 AS x, 1.5e-7 AS y, 2 AS n", &[])
        .await
        .expect("expressions");
    assert_eq!(row.get::<_, f64>(0), 3.0);
    assert_eq!(row.get::<_, f64>(1), 1.5e-7);
    assert_eq!(row.get::<_, i64>(2), 2);
    // What drivers ask on connecting.
    let mut stg = stg;
    let (v, _) = run(&mut stg, "select pg_catalog.version()").await;
    assert!(
        v[0][0].as_deref().unwrap().starts_with("PostgreSQL 15"),
        "{v:?}"
    );
    let (schema, _) = run(&mut stg, "select current_schema()").await;
    assert_eq!(schema, vec![vec![Some("public".into())]]);
    let (iso, _) = run(&mut stg, "show transaction isolation level").await;
    assert_eq!(iso, vec![vec![Some("serializable".into())]]);
    let (_, message) = refused(&stg, "SHOW work_mem").await;
    assert!(
        message.contains("unrecognized configuration parameter \"work_mem\""),
        "{message}"
    );
    let (code, message) = refused(&stg, "SELECT * FROM pg_catalog.pg_stat_activity").await;
    assert!(
        message.contains("catalogue query is not supported"),
        "{code} {message}"
    );
}
