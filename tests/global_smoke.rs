use std::collections::BTreeMap;
use std::path::PathBuf;

use snaps::localnet::{LocalNetwork, load_site};
use snaps_schema::{NetworkConfig, datagen};

#[tokio::test]
async fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let network = NetworkConfig::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology")).unwrap();
    let data = datagen::generate(&network, &datagen::Scale::new(50), 7).unwrap();
    let net = LocalNetwork::start(network.clone(), dir.path().join("g.db"), BTreeMap::new()).await.unwrap();
    for (code, d) in &data {
        let c = net.client(code.as_str()).await.unwrap();
        let hello = c.hello(&network.global_catalog().unwrap().fingerprint()).await.unwrap();
        println!("{hello:?}");
        let r = load_site(&c, &net.mapping(code.as_str()).unwrap(), &d.rows, 1000).await.unwrap();
        println!("{code}: {} loaded {} already {} conflicts", r.loaded, r.already_loaded, r.conflicts.len());
    }
    let c = net.client("STG").await.unwrap();
    let m = net.mapping("STG").unwrap();
    let local = network.local_catalog(network.site("STG").unwrap()).unwrap();
    let (_, stmts) = snaps_mapping::parse("SELECT p.surname, v.date FROM patient p, visit v WHERE p.pno = v.pno AND p.surname LIKE 'S%'").unwrap();
    let snaps_mapping::Statement::Select(s) = &stmts[0] else { panic!() };
    let plan = snaps_mapping::rewrite::plan(s, &local, &m).unwrap();
    let q = plan.query.unwrap();
    let req = snaps_proto::fetch_request(&q);
    let reply = c.fetch(req.clone()).await.unwrap();
    for t in &reply.tables { println!("table {} count {}", t.table, t.count); }
    let again = c.fetch(req).await.unwrap();
    println!("again: {}", again.tables.len());
    println!("wire: sent {} received {}", c.counters().sent(), c.counters().received());
    let st = c.status().await.unwrap();
    println!("{st:#?}");
    net.stop().await.unwrap();
}
