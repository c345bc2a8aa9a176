//! The fixture networks in `fixtures/` read as the thesis describes them
//! (appendices H and I, figures 4.4 to 4.6), their mapping files are
//! consistent with the schemas, and the seeded data generator makes data that
//! fits the radiology schema and the network's key rules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use snaps_schema::datagen::{Scale, SiteData, generate};
use snaps_schema::{Catalog, KeyRange, NetworkConfig, SiteCode, Value, ValueType};

fn load(network: &str) -> NetworkConfig {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures")).join(network);
    NetworkConfig::load(&dir).unwrap_or_else(|e| panic!("load {network}: {e}"))
}

fn ty(name: &str) -> ValueType {
    ValueType::from_thesis(name).unwrap_or_else(|| panic!("bad type {name}"))
}

/// Asserts that `catalog` holds exactly `expected`: relation names, attribute
/// names in order with their types, and keys.
fn assert_schema(catalog: &Catalog, expected: &[(&str, &str, &[&str])], what: &str) {
    let names: Vec<&str> = catalog.relations().map(|r| r.name.as_str()).collect();
    let mut want: Vec<&str> = expected.iter().map(|(r, _, _)| *r).collect();
    want.sort_unstable();
    assert_eq!(names, want, "{what}: relations");
    for (relation, attributes, key) in expected {
        let r = catalog.relation(relation).unwrap();
        let got: Vec<String> = r
            .attributes
            .iter()
            .map(|a| format!("{} {}", a.name, a.ty))
            .collect();
        let want: Vec<String> = attributes
            .split(',')
            .map(|a| {
                let (name, t) = a.trim().split_once(' ').unwrap();
                format!("{name} {}", ty(t))
            })
            .collect();
        assert_eq!(got, want, "{what}: attributes of {relation}");
        assert_eq!(r.key, key.to_vec(), "{what}: key of {relation}");
    }
}

/// Appendix H, in the appendix' order.
const APPENDIX_H: &[(&str, &str, &[&str])] = &[
    (
        "doctor",
        "code i4, title c2, initials c4, surname c22, add1 c20, add2 c20, add3 c20, phone c10",
        &["code"],
    ),
    (
        "out_go_r",
        "to_site c4, from_site c4, pno i4, date i4",
        &["to_site", "from_site", "pno", "date"],
    ),
    (
        "patient",
        "pno i4, ad_no c7, title c4, surname c22, first_names c24, dob i4, sex c1, race c4, \
         add1 c20, add2 c20, add3 c20, post_mortem c1, dod i4, vip c1, contrast_sen c1, gp i2, \
         no_of_visits i2, film_locate c8, perm_temp c1, old_card c1, dont_destroy c1, \
         films_in_mus c1, account_due c1, med_insure c1",
        &["pno"],
    ),
    (
        "rsb_codes",
        "rsb_code c3, description c40, time_req i2, mayo_units i2, exam_total_f f4, \
         rsb_rebate f4, code_1 c3, code_2 c3, code_3 c3",
        &["rsb_code"],
    ),
    (
        "sites",
        "code c4, int_code i2, name c30, this_site c1, add1 c25, add2 c25, add3 c25, phone c10, \
         discount c3, dept_vno c12, gst_no c15, acc_no c15, label_addr c5, recpt_addr c5, \
         inv_addr c5, print_labels c1, print_rec c1, print_inv c1, skip_rep_lin i2, \
         exit_recpt i2, exit_radio i2, no_labels i2",
        &["code"],
    ),
    (
        "visit",
        "vno i4, pno i4, pvno i2, dept_vno c8, date i4, time i2, pat_location c8, pat_type c3, \
         refer_doctor i4, hosp_consult i4, description c30, rsb1 c3, rsb2 c3, rsb3 c3, rsb4 c3, \
         rsb5 c3, rsb6 c3, roe1 f4, roe2 f4, roe3 f4, roe4 f4, radgrapher c4, radiation_do i4, \
         rad_report c4, rad_verify c4, mayo_units i2, films_destry c1, teaching_use c1, \
         rep_name c8, compressed c1",
        &["vno", "pno"],
    ),
    (
        "visit_rep",
        "vno i4, line_no i2, line c80",
        &["vno", "line_no"],
    ),
];

/// Appendix I, with visit.date i4 (the appendix' i2 cannot hold YYYYMMDD).
const APPENDIX_I: &[(&str, &str, &[&str])] = &[
    (
        "doctor",
        "code i4, title c2, initials c4, surname c22, add1 c20, add2 c20, add3 c20, phone c12",
        &["code"],
    ),
    (
        "out_go_r",
        "to_site c4, from_site c4, pno i4, date i4",
        &["to_site", "from_site", "pno", "date"],
    ),
    (
        "patient",
        "pno i4, ad_no c7, title c4, surname c22, first_names c24, dob i4, sex c1, race c4, \
         add1 c20, add2 c20, add3 c20, post_mortem c1, dod i4, contrast_sen c1, gp i4",
        &["pno"],
    ),
    (
        "sites",
        "code c4, int_code i2, name c30, add1 c25, add2 c25, add3 c25, phone c10",
        &["code"],
    ),
    (
        "visit",
        "vno i4, pno i4, date i4, time i2, description c30, pat_location c4, pat_type c3, \
         refer_doctor i4, hosp_consult i4, reo1 f4, reo2 f4, reo3 f4, reo4 f4",
        &["vno", "pno"],
    ),
    (
        "visit_rep",
        "vno i4, line_no i2, line c80",
        &["vno", "line_no"],
    ),
];

#[test]
fn radiology_schemas_are_appendices_h_and_i() {
    let net = load("radiology");
    assert_eq!(net.name, "christchurch");
    assert_schema(&net.global_catalog().unwrap(), APPENDIX_I, "global");
    for site in &net.sites {
        assert_schema(
            &net.local_catalog(site).unwrap(),
            APPENDIX_H,
            site.code.as_str(),
        );
    }
    // The differences the mappings must bridge.
    let local = net.local_catalog(&net.sites[0]).unwrap();
    let global = net.global_catalog().unwrap();
    let t = |c: &Catalog, r: &str, a: &str| c.relation(r).unwrap().attribute(a).unwrap().ty;
    assert_eq!(t(&local, "patient", "gp"), ValueType::Int2);
    assert_eq!(t(&global, "patient", "gp"), ValueType::Int4);
    assert_eq!(t(&local, "doctor", "phone"), ValueType::Char(10));
    assert_eq!(t(&global, "doctor", "phone"), ValueType::Char(12));
    assert_eq!(t(&local, "visit", "pat_location"), ValueType::Char(8));
    assert_eq!(t(&global, "visit", "pat_location"), ValueType::Char(4));
    assert_eq!(t(&global, "visit", "date"), ValueType::Int4);
}

#[test]
fn radiology_network_has_the_christchurch_sites() {
    use snaps_schema::RelationMode::{ReadOnly, ReadWrite};
    let net = load("radiology");
    let sites: Vec<(&str, u32, &str, bool)> = net
        .sites
        .iter()
        .map(|s| (s.code.as_str(), s.number.0, s.name.as_str(), s.home))
        .collect();
    assert_eq!(
        sites,
        vec![
            ("CPH", 1, "Christchurch Public Hospital", true),
            ("STG", 2, "St Georges Hospital", false),
            ("GRC", 3, "Gloucester Radiology Clinic", false),
        ]
    );
    for (relation, mode) in [
        ("patient", ReadWrite),
        ("doctor", ReadWrite),
        ("visit", ReadOnly),
        ("visit_rep", ReadOnly),
        ("out_go_r", ReadOnly),
        ("sites", ReadOnly),
    ] {
        assert_eq!(net.mode(relation), mode, "{relation}");
    }
    for site in &net.sites {
        // Doctor codes live in patient.gp, an i2 at every site.
        let doctors = site.key_range("doctor");
        assert!(doctors.last <= i64::from(i16::MAX), "{}", site.code);
        assert!(site.keys.len() >= 1_000_000, "{}", site.code);
        assert!(site.keys.last <= i64::from(i32::MAX), "{}", site.code);
    }
}

/// One row of a mapping file.
#[derive(Debug)]
struct MappingRow {
    line: usize,
    local_relation: String,
    local_attribute: String,
    global_relation: String,
    global_attribute: String,
    conversion: Option<(String, String)>,
}

/// Reads a mapping file: whitespace-separated fields, `#` comments.
fn read_mapping(net: &NetworkConfig, path: &Path) -> Vec<MappingRow> {
    let text = std::fs::read_to_string(net.path(path)).unwrap();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let content = line.split('#').next().unwrap_or("");
        let f: Vec<&str> = content.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        assert!(
            f.len() == 4 || f.len() == 6,
            "{}:{line_no}: 4 or 6 fields, found {f:?}",
            path.display()
        );
        rows.push(MappingRow {
            line: line_no,
            local_relation: f[0].into(),
            local_attribute: f[1].into(),
            global_relation: f[2].into(),
            global_attribute: f[3].into(),
            conversion: (f.len() == 6).then(|| (f[4].to_string(), f[5].to_string())),
        });
    }
    rows
}

/// Reads a qualification file: relation, a tab, the qualification.
fn read_qualification(net: &NetworkConfig, path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(net.path(path)).unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (r, q) = l.split_once('\t').expect("relation<TAB>qualification");
            (r.to_string(), q.trim().to_string())
        })
        .collect()
}

/// The conversion pair (to global, to local) the mapping rules require
/// between two types, or `None` when they are equal.
fn required_conversion(
    local: ValueType,
    global: ValueType,
) -> Option<(&'static str, &'static str)> {
    use ValueType::{Char, Int2, Int4};
    match (local, global) {
        _ if local == global => None,
        (Int2, Int4) => Some(("int_widen", "int_narrow")),
        (Int4, Int2) => Some(("int_narrow", "int_widen")),
        (Char(n), Char(m)) if n < m => Some(("char_widen", "char_narrow")),
        (Char(_), Char(_)) => Some(("char_narrow", "char_widen")),
        _ => panic!("no conversion exists from {local} to {global}"),
    }
}

/// Checks every site's mapping against the catalogs and the mapping rules;
/// returns, per site, the set of `local.attr -> global.attr` rows.
fn check_mappings(net: &NetworkConfig) -> BTreeMap<String, BTreeSet<String>> {
    let global = net.global_catalog().unwrap();
    let mut out = BTreeMap::new();
    for site in &net.sites {
        let local = net.local_catalog(site).unwrap();
        let rows = read_mapping(net, &site.mapping);
        let at = |r: &MappingRow| format!("{} {}:{}", site.code, site.mapping.display(), r.line);
        let mut locals_per_global = BTreeSet::new();
        let mut globals = BTreeSet::new();
        let mut mapped: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for r in &rows {
            let lr = local
                .relation(&r.local_relation)
                .unwrap_or_else(|| panic!("{}", at(r)));
            let la = lr
                .attribute(&r.local_attribute)
                .unwrap_or_else(|| panic!("{}", at(r)));
            let gr = global
                .relation(&r.global_relation)
                .unwrap_or_else(|| panic!("{}", at(r)));
            let ga = gr
                .attribute(&r.global_attribute)
                .unwrap_or_else(|| panic!("{}", at(r)));
            let want = required_conversion(la.ty, ga.ty);
            let got = r.conversion.as_ref().map(|(a, b)| (a.as_str(), b.as_str()));
            assert_eq!(got, want, "{}: {} -> {}", at(r), la.ty, ga.ty);
            assert!(
                locals_per_global.insert((
                    &r.local_relation,
                    &r.local_attribute,
                    &r.global_relation
                )),
                "{}: local attribute mapped twice onto one global relation",
                at(r)
            );
            assert!(
                globals.insert((&r.global_relation, &r.global_attribute)),
                "{}: global attribute mapped twice",
                at(r)
            );
            mapped
                .entry(&r.global_relation)
                .or_default()
                .insert(&r.global_attribute);
        }
        for (relation, attributes) in &mapped {
            for k in &global.relation(relation).unwrap().key {
                assert!(
                    attributes.contains(k.as_str()),
                    "{}: key {relation}.{k} unmapped",
                    site.code
                );
            }
        }
        for (relation, qualification) in
            read_qualification(net, site.qualification.as_ref().unwrap())
        {
            assert!(
                local.relation(&relation).is_some(),
                "{}: {relation}",
                site.code
            );
            assert!(!qualification.is_empty());
        }
        let set = rows
            .iter()
            .map(|r| {
                format!(
                    "{}.{} -> {}.{}",
                    r.local_relation, r.local_attribute, r.global_relation, r.global_attribute
                )
            })
            .collect();
        out.insert(site.code.to_string(), set);
    }
    out
}

#[test]
fn radiology_mappings_follow_the_rules_and_differ_by_site() {
    let net = load("radiology");
    let maps = check_mappings(&net);
    let global = net.global_catalog().unwrap();
    let relations_of = |code: &str| -> BTreeSet<String> {
        maps[code]
            .iter()
            .map(|m| {
                m.split(" -> ")
                    .nth(1)
                    .unwrap()
                    .split('.')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };

    // CPH maps every global attribute of every global relation.
    let cph = &maps["CPH"];
    let every: usize = global.relations().map(|r| r.attributes.len()).sum();
    assert_eq!(cph.len(), every);
    assert!(cph.contains("visit.roe1 -> visit.reo1"));
    assert!(cph.contains("visit.roe4 -> visit.reo4"));
    assert!(cph.contains("sites.code -> sites.code"));

    // Only CPH exports sites; STG and GRC export no requests either.
    for code in ["STG", "GRC"] {
        let relations = relations_of(code);
        assert!(!relations.contains("sites"), "{code}");
        assert!(!relations.contains("out_go_r"), "{code}");
        for r in ["doctor", "patient", "visit", "visit_rep"] {
            assert!(relations.contains(r), "{code} maps {r}");
        }
    }
    let stg = &maps["STG"];
    for hidden in [
        "patient.race",
        "patient.post_mortem",
        "patient.dod",
        "patient.contrast_sen",
        "visit.roe1",
        "visit.time",
        "doctor.add1",
    ] {
        assert!(
            !stg.iter().any(|m| m.starts_with(&format!("{hidden} "))),
            "STG maps {hidden}"
        );
    }
    let grc = &maps["GRC"];
    assert!(grc.contains("patient.gp -> patient.gp"));
    assert!(grc.contains("visit.roe2 -> visit.reo2"));
    assert!(grc.contains("doctor.phone -> doctor.phone"));
    assert!(grc.len() < cph.len() && stg.len() < cph.len());
    assert_ne!(grc, stg);

    for site in &net.sites {
        let rows = read_qualification(&net, site.qualification.as_ref().unwrap());
        assert!(
            rows.is_empty(),
            "{}: radiology mappings are one-to-one",
            site.code
        );
    }
}

#[test]
fn figures_network_shows_figures_4_4_to_4_6() {
    let net = load("figures");
    assert_eq!(net.name, "figures");
    let global = net.global_catalog().unwrap();
    assert_schema(
        &global,
        &[
            ("visit", "vno i4, pno i4, date c8, when c5", &["vno"]),
            ("pat_addr", "pno i4, name c20, addr c30", &["pno"]),
            ("pat_other", "pno i4, dob i4", &["pno"]),
            ("pat_phone", "name c20, phone c10", &[]),
            ("pat_sex", "name c20, sex c1", &[]),
        ],
        "figures global",
    );
    let codes: Vec<(&str, u32)> = net
        .sites
        .iter()
        .map(|s| (s.code.as_str(), s.number.0))
        .collect();
    assert_eq!(codes, vec![("A", 1), ("B", 2), ("C", 3)]);
    let ranges: Vec<KeyRange> = net.sites.iter().map(|s| s.keys).collect();
    assert_eq!(
        ranges,
        vec![
            KeyRange {
                first: 1,
                last: 999
            },
            KeyRange {
                first: 1000,
                last: 1999
            },
            KeyRange {
                first: 2000,
                last: 2999
            },
        ]
    );

    let maps = check_mappings(&net);
    let set = |rows: &[&str]| rows.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        maps["A"],
        set(&[
            "visit.vno -> visit.vno",
            "visit.pno -> visit.pno",
            "visit.date -> visit.date",
            "visit.time -> visit.when",
            "patient.pno -> pat_addr.pno",
            "patient.name -> pat_addr.name",
            "patient.addr -> pat_addr.addr",
            "patient.pno -> pat_other.pno",
            "patient.dob -> pat_other.dob",
        ])
    );
    assert_eq!(
        maps["B"],
        set(&[
            "visit.vno -> visit.vno",
            "visit.pno -> visit.pno",
            "visit.date -> visit.date",
            "patient.pno -> pat_addr.pno",
            "patient.name -> pat_addr.name",
            "patient.addr -> pat_addr.addr",
        ])
    );
    assert_eq!(
        maps["C"],
        set(&[
            "patient.name -> pat_phone.name",
            "patient.phone -> pat_phone.phone",
            "patient.name -> pat_sex.name",
            "patient.sex -> pat_sex.sex",
        ])
    );
    let q = |code: &str| {
        let site = net.site(code).unwrap();
        read_qualification(&net, site.qualification.as_ref().unwrap())
    };
    assert_eq!(
        q("A"),
        vec![("patient".into(), "pat_addr.pno = pat_other.pno".into())]
    );
    assert_eq!(q("B"), vec![]);
    assert_eq!(
        q("C"),
        vec![(
            "patient".into(),
            "pat_phone.tuple_id = pat_sex.main_tuple_id".into()
        )]
    );
    let c = net.local_catalog(net.site("C").unwrap()).unwrap();
    assert!(
        c.relation("patient").unwrap().key.is_empty(),
        "figure 4.6: non-unique key"
    );
}

fn radiology_data(patients: usize, seed: u64) -> BTreeMap<SiteCode, SiteData> {
    generate(&load("radiology"), &Scale::new(patients), seed).unwrap()
}

/// The value of `attribute` in `row` of local relation `relation`.
fn col<'a>(catalog: &Catalog, relation: &str, attribute: &str, row: &'a [Value]) -> &'a Value {
    &row[catalog
        .relation(relation)
        .unwrap()
        .position(attribute)
        .unwrap()]
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => panic!("not an integer: {other}"),
    }
}

#[test]
fn generator_is_deterministic_per_seed() {
    let a = radiology_data(60, 42);
    let b = radiology_data(60, 42);
    let c = radiology_data(60, 43);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        a.keys().map(|c| c.as_str()).collect::<Vec<_>>(),
        vec!["CPH", "GRC", "STG"]
    );
}

#[test]
fn generated_values_fit_the_schema_and_the_global_snapshot() {
    let net = load("radiology");
    let data = radiology_data(150, 7);
    let global = net.global_catalog().unwrap();
    for site in &net.sites {
        let catalog = net.local_catalog(site).unwrap();
        let site_data = &data[&site.code];
        for relation in catalog.relations() {
            let rows = &site_data.rows[&relation.name];
            assert!(!rows.is_empty(), "{} {}", site.code, relation.name);
            for row in rows {
                assert_eq!(row.len(), relation.attributes.len());
                for (attribute, value) in relation.attributes.iter().zip(row) {
                    let what = format!("{} {}.{}", site.code, relation.name, attribute.name);
                    attribute.ty.check(value.clone(), &what).unwrap();
                    assert!(!(attribute.not_null && value.is_null()), "{what} is null");
                }
            }
        }
        // Every mapped value also fits the global attribute, so exporting
        // (char_narrow of pat_location, int_widen of gp) never fails.
        for m in read_mapping(&net, &site.mapping) {
            let ga = global
                .relation(&m.global_relation)
                .unwrap()
                .attribute(&m.global_attribute)
                .unwrap();
            for row in &site_data.rows[&m.local_relation] {
                let v = col(&catalog, &m.local_relation, &m.local_attribute, row);
                ga.ty.check(v.clone(), &m.global_attribute).unwrap();
            }
        }
    }
}

#[test]
fn generated_keys_are_unique_network_wide_and_in_range() {
    let net = load("radiology");
    let data = radiology_data(150, 11);
    let mut seen: BTreeMap<String, BTreeSet<Vec<Value>>> = BTreeMap::new();
    let mut vnos = BTreeSet::new();
    for site in &net.sites {
        let catalog = net.local_catalog(site).unwrap();
        for relation in catalog.relations() {
            // rsb_codes and sites are reference lists every site holds a copy of.
            if matches!(relation.name.as_str(), "rsb_codes" | "sites") {
                continue;
            }
            let keys = seen.entry(relation.name.clone()).or_default();
            for row in &data[&site.code].rows[&relation.name] {
                let key: Vec<Value> = relation
                    .key
                    .iter()
                    .map(|k| row[relation.position(k).unwrap()].clone())
                    .collect();
                assert!(
                    keys.insert(key.clone()),
                    "{} {}: duplicate key {key:?}",
                    site.code,
                    relation.name
                );
            }
        }
        let rows = &data[&site.code].rows;
        for row in &rows["patient"] {
            let pno = int(col(&catalog, "patient", "pno", row));
            assert!(
                site.key_range("patient").contains(pno),
                "{} pno {pno}",
                site.code
            );
        }
        for row in &rows["visit"] {
            let vno = int(col(&catalog, "visit", "vno", row));
            assert!(
                site.key_range("visit").contains(vno),
                "{} vno {vno}",
                site.code
            );
            assert!(vnos.insert(vno), "vno {vno} twice");
        }
        for row in &rows["doctor"] {
            let code = int(col(&catalog, "doctor", "code", row));
            assert!(
                site.key_range("doctor").contains(code),
                "{} doctor {code}",
                site.code
            );
        }
    }
}

#[test]
fn generated_references_stay_within_the_site() {
    let net = load("radiology");
    let data = radiology_data(120, 5);
    for site in &net.sites {
        let c = net.local_catalog(site).unwrap();
        let rows = &data[&site.code].rows;
        let doctors: BTreeSet<i64> = rows["doctor"]
            .iter()
            .map(|r| int(col(&c, "doctor", "code", r)))
            .collect();
        let pnos: BTreeSet<i64> = rows["patient"]
            .iter()
            .map(|r| int(col(&c, "patient", "pno", r)))
            .collect();
        let mut visits_of: BTreeMap<i64, i64> = BTreeMap::new();
        let mut vnos = BTreeSet::new();
        for r in &rows["visit"] {
            let pno = int(col(&c, "visit", "pno", r));
            assert!(
                pnos.contains(&pno),
                "{}: visit of unknown patient {pno}",
                site.code
            );
            *visits_of.entry(pno).or_default() += 1;
            vnos.insert(int(col(&c, "visit", "vno", r)));
            assert!(doctors.contains(&int(col(&c, "visit", "refer_doctor", r))));
            let consult = col(&c, "visit", "hosp_consult", r);
            assert!(consult.is_null() || doctors.contains(&int(consult)));
            let date = int(col(&c, "visit", "date", r));
            assert!((19840101..=19880630).contains(&date), "{date}");
            let time = int(col(&c, "visit", "time", r));
            assert!(time % 100 < 60 && time / 100 < 24, "{time}");
        }
        for r in &rows["patient"] {
            let pno = int(col(&c, "patient", "pno", r));
            let gp = int(col(&c, "patient", "gp", r));
            assert!(
                doctors.contains(&gp),
                "{}: gp {gp} is not a doctor of the site",
                site.code
            );
            let n = int(col(&c, "patient", "no_of_visits", r));
            assert_eq!(n, visits_of.get(&pno).copied().unwrap_or(0));
            let sex = col(&c, "patient", "sex", r);
            assert!(*sex == Value::text("M") || *sex == Value::text("F"));
        }
        for r in &rows["visit_rep"] {
            assert!(vnos.contains(&int(col(&c, "visit_rep", "vno", r))));
        }
        for r in &rows["out_go_r"] {
            assert_eq!(
                *col(&c, "out_go_r", "from_site", r),
                Value::text(site.code.as_str())
            );
            assert_ne!(
                *col(&c, "out_go_r", "to_site", r),
                Value::text(site.code.as_str())
            );
            assert!(pnos.contains(&int(col(&c, "out_go_r", "pno", r))));
        }
        assert!(!rows["out_go_r"].is_empty(), "{}: some requests", site.code);
    }
}

#[test]
fn reference_relations_are_the_same_at_every_site() {
    let net = load("radiology");
    let data = radiology_data(20, 3);
    let c = net.local_catalog(&net.sites[0]).unwrap();
    let this_site = c.relation("sites").unwrap().position("this_site").unwrap();
    let without_this_site = |rows: &Vec<Vec<Value>>| -> Vec<Vec<Value>> {
        rows.iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != this_site)
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .collect()
    };
    let first = &data[&net.sites[0].code].rows;
    for site in &net.sites {
        let rows = &data[&site.code].rows;
        assert_eq!(rows["rsb_codes"], first["rsb_codes"], "{}", site.code);
        assert_eq!(
            without_this_site(&rows["sites"]),
            without_this_site(&first["sites"])
        );
        assert_eq!(rows["sites"].len(), net.sites.len());
        for r in &rows["sites"] {
            let own = *col(&c, "sites", "code", r) == Value::text(site.code.as_str());
            assert_eq!(r[this_site], Value::text(if own { "Y" } else { "N" }));
        }
    }
}

#[test]
fn some_people_are_patients_at_several_sites_registered_with_variations() {
    let net = load("radiology");
    let data = radiology_data(400, 9);
    // person -> [(site, pno, (surname, first names, dob, sex, add1))]
    let mut records: BTreeMap<u64, Vec<(String, i64, Vec<Value>)>> = BTreeMap::new();
    let mut visited: BTreeSet<(String, i64)> = BTreeSet::new();
    for site in &net.sites {
        let c = net.local_catalog(site).unwrap();
        let d = &data[&site.code];
        assert_eq!(
            d.person_of.len(),
            d.rows["patient"].len(),
            "every record has its person"
        );
        for r in &d.rows["patient"] {
            let details = ["surname", "first_names", "dob", "sex", "add1"]
                .iter()
                .map(|a| col(&c, "patient", a, r).clone())
                .collect();
            let pno = int(col(&c, "patient", "pno", r));
            records.entry(d.person_of[&pno]).or_default().push((
                site.code.to_string(),
                pno,
                details,
            ));
        }
        for r in &d.rows["visit"] {
            visited.insert((site.code.to_string(), int(col(&c, "visit", "pno", r))));
        }
    }
    let shared: Vec<_> = records.values().filter(|r| r.len() > 1).collect();
    assert!(shared.len() >= 40, "only {} shared people", shared.len());
    assert!(
        shared.iter().any(|r| r.len() == 3),
        "someone is at all three sites"
    );
    let (mut same, mut varied, mut moved) = (0, 0, 0);
    for at in &shared {
        let sites: BTreeSet<&String> = at.iter().map(|(s, ..)| s).collect();
        assert_eq!(sites.len(), at.len(), "one record per site: {at:?}");
        for (site, pno, details) in at.iter() {
            assert!(
                visited.contains(&(site.clone(), *pno)),
                "{site} {pno} has a visit"
            );
            assert_eq!(details[3], at[0].2[3], "the sex is recorded alike: {at:?}");
        }
        for (.., details) in &at[1..] {
            if details[..3] == at[0].2[..3] {
                same += 1;
            } else {
                varied += 1;
            }
            moved += usize::from(details[4] != at[0].2[4]);
        }
    }
    // Most second registrations agree on the names and the birth date; some
    // do not, as at real sites; a few people have moved.
    assert!(
        same > 3 * varied && varied >= 5,
        "{same} alike, {varied} varied"
    );
    assert!(moved >= 5, "{moved} moved");
}

#[test]
fn scale_zero_gives_empty_patient_relations() {
    let net = load("radiology");
    let data = generate(&net, &Scale::new(0), 1).unwrap();
    for site in &net.sites {
        let rows = &data[&site.code].rows;
        assert!(rows["patient"].is_empty());
        assert!(rows["visit"].is_empty());
        assert!(rows["visit_rep"].is_empty());
        assert!(rows["out_go_r"].is_empty());
        assert_eq!(rows["doctor"].len(), 5);
        assert_eq!(rows["sites"].len(), 3);
    }
}

#[test]
fn scale_is_honoured_on_average() {
    let net = load("radiology");
    let scale = Scale::new(400);
    assert_eq!(scale.doctors_per_site, 13);
    let data = generate(&net, &scale, 2).unwrap();
    for site in &net.sites {
        let rows = &data[&site.code].rows;
        assert_eq!(rows["patient"].len(), 400);
        assert_eq!(rows["doctor"].len(), 13);
        let visits = rows["visit"].len() as f64 / 400.0;
        assert!(
            (1.7..2.4).contains(&visits),
            "{} visits per patient",
            visits
        );
        let lines = rows["visit_rep"].len() as f64 / rows["visit"].len() as f64;
        assert!((3.6..4.4).contains(&lines), "{lines} lines per report");
    }
}

#[test]
fn too_small_key_range_names_the_site() {
    let mut net = load("radiology");
    net.sites[2].keys = KeyRange {
        first: 20_000_000,
        last: 20_000_049,
    };
    let err = generate(&net, &Scale::new(100), 1).unwrap_err().to_string();
    assert!(err.contains("GRC"), "{err}");
    assert!(err.contains("patient"), "{err}");

    // Room for the patients but not for their visits.
    net.sites[2].keys = KeyRange {
        first: 20_000_000,
        last: 20_000_119,
    };
    let err = generate(&net, &Scale::new(100), 1).unwrap_err().to_string();
    assert!(err.contains("GRC") && err.contains("visit"), "{err}");

    // Doctor codes that do not fit patient.gp (i2).
    let mut net = load("radiology");
    net.sites[1].key_ranges.insert(
        "doctor".into(),
        KeyRange {
            first: 40_000,
            last: 49_999,
        },
    );
    let err = generate(&net, &Scale::new(10), 1).unwrap_err().to_string();
    assert!(err.contains("STG") && err.contains("patient.gp"), "{err}");
}

#[test]
fn bad_scales_are_refused() {
    let net = load("radiology");
    let mut scale = Scale::new(10);
    scale.shared_fraction = 1.5;
    assert!(generate(&net, &scale, 1).is_err());
    let mut scale = Scale::new(10);
    scale.visits_per_patient = f64::NAN;
    assert!(generate(&net, &scale, 1).is_err());
}
