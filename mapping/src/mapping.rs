//! A site's mapping and mapping-qualification tables (chapter 4, appendices C
//! and D): which local attribute goes to which global attribute, with optional
//! conversion functions, and how a local relation split over several global
//! relations is reassembled.
//!
//! Rows come from the site's `snaps_mapping` tables or, in fixtures, from
//! whitespace-separated files. Every row is validated when the mapping is
//! built, and every error names the row.

use std::collections::BTreeMap;

use serde::Serialize;
use snaps_schema::{Catalog, Relation, Value, ValueType};

use crate::{Error, Result};

/// One row of the mapping table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MappingRow {
    /// Row number, for messages (the line in a file, the row in a table).
    pub row: usize,
    /// Local relation.
    pub local_relation: String,
    /// Local attribute.
    pub local_attribute: String,
    /// Global relation.
    pub global_relation: String,
    /// Global attribute.
    pub global_attribute: String,
    /// Conversion from the local to the global type.
    pub to_global: Option<String>,
    /// Conversion from the global to the local type.
    pub to_local: Option<String>,
}

/// One row of the mapping-qualification table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct QualificationRow {
    /// Row number, for messages.
    pub row: usize,
    /// The split local relation.
    pub local_relation: String,
    /// The join that reassembles it, e.g. `pat_addr.pno = pat_other.pno`.
    pub qualification: String,
}

fn fields(line: &str) -> Vec<String> {
    let content = line.split('#').next().unwrap_or("");
    content
        .split_whitespace()
        .map(|f| f.replace('-', "_").to_lowercase())
        .collect()
}

/// Reads mapping rows: `local_relation local_attribute global_relation
/// global_attribute [to_global to_local]` per line, `#` comments.
pub fn parse_mapping_rows(text: &str) -> Result<Vec<MappingRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f = fields(line);
        let row = i + 1;
        let (to_global, to_local) = match f.len() {
            0 => continue,
            4 => (None, None),
            6 => (Some(f[4].clone()), Some(f[5].clone())),
            5 => {
                return Err(Error::Mapping(format!(
                    "mapping row {row}: a conversion needs both functions, to_global and to_local"
                )));
            }
            n => {
                return Err(Error::Mapping(format!(
                    "mapping row {row}: expected 4 or 6 fields, found {n}"
                )));
            }
        };
        rows.push(MappingRow {
            row,
            local_relation: f[0].clone(),
            local_attribute: f[1].clone(),
            global_relation: f[2].clone(),
            global_attribute: f[3].clone(),
            to_global,
            to_local,
        });
    }
    Ok(rows)
}

/// Reads mapping-qualification rows: `local_relation qualification...` per
/// line, `#` comments.
pub fn parse_qualification_rows(text: &str) -> Result<Vec<QualificationRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let (rel, qual) = content.split_once(char::is_whitespace).ok_or_else(|| {
            Error::Mapping(format!(
                "qualification row {}: expected a relation and a qualification",
                i + 1
            ))
        })?;
        rows.push(QualificationRow {
            row: i + 1,
            local_relation: rel.replace('-', "_").to_lowercase(),
            qualification: qual.trim().to_string(),
        });
    }
    Ok(rows)
}

/// A conversion function between a local and a global type. Every function
/// SNAPS offers keeps values and their order (it only changes the width and
/// checks the value fits), so predicates and joins map through it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    /// `int_widen`: i2 → i4.
    IntWiden,
    /// `int_narrow`: i4 → i2, failing for values out of range.
    IntNarrow,
    /// `char_widen`: cN → cM with N < M.
    CharWiden,
    /// `char_narrow`: cM → cN with N < M, failing for longer text.
    CharNarrow,
}

impl Conversion {
    /// The names administrators write in mapping rows.
    pub const NAMES: &[&str] = &["int_widen", "int_narrow", "char_widen", "char_narrow"];

    fn by_name(name: &str) -> Option<Conversion> {
        match name {
            "int_widen" => Some(Conversion::IntWiden),
            "int_narrow" => Some(Conversion::IntNarrow),
            "char_widen" => Some(Conversion::CharWiden),
            "char_narrow" => Some(Conversion::CharNarrow),
            _ => None,
        }
    }

    /// The name written in mapping rows.
    pub fn name(self) -> &'static str {
        match self {
            Conversion::IntWiden => "int_widen",
            Conversion::IntNarrow => "int_narrow",
            Conversion::CharWiden => "char_widen",
            Conversion::CharNarrow => "char_narrow",
        }
    }

    fn fits(self, from: ValueType, to: ValueType) -> bool {
        match (self, from, to) {
            (Conversion::IntWiden, ValueType::Int2, ValueType::Int4) => true,
            (Conversion::IntNarrow, ValueType::Int4, ValueType::Int2) => true,
            (Conversion::CharWiden, ValueType::Char(a), ValueType::Char(b)) => a < b,
            (Conversion::CharNarrow, ValueType::Char(a), ValueType::Char(b)) => a > b,
            _ => false,
        }
    }

    /// Converts `value` to type `to`; `what` names the attribute in errors.
    pub fn apply(self, value: &Value, to: ValueType, what: &str) -> Result<Value> {
        to.check(value.clone(), what)
            .map_err(|e| Error::Conversion(format!("{} cannot convert: {e}", self.name())))
    }
}

/// How one local attribute maps onto one global attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttrMap {
    /// Local attribute.
    pub local: String,
    /// Its local type.
    pub local_type: ValueType,
    /// Global attribute.
    pub global: String,
    /// Its global type.
    pub global_type: ValueType,
    /// Local → global conversion.
    pub to_global: Option<Conversion>,
    /// Global → local conversion.
    pub to_local: Option<Conversion>,
}

/// The attributes a local relation maps onto one global relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Part {
    /// The global relation.
    pub global: String,
    /// Attribute maps, in mapping-row order.
    pub attrs: Vec<AttrMap>,
}

/// How a local relation split over several global relations is put back
/// together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Split {
    /// One global relation: nothing to reassemble.
    None,
    /// One-to-many by a unique key: the parts are joined on the local
    /// attributes listed (each mapped onto every part).
    Key(Vec<String>),
    /// One-to-many by a non-unique key: part `main` (an index into the parts)
    /// holds the main tuple; every other part carries its tuple id as
    /// `main_tuple_id`.
    MainTupleId(usize),
}

/// The mapping of one local relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelationMapping {
    /// The local relation, as the site's catalog declares it.
    pub local: Relation,
    /// The global relations it maps onto, in the order first mapped.
    pub parts: Vec<Part>,
    /// How the parts are reassembled.
    pub split: Split,
}

impl RelationMapping {
    /// Every (part index, attribute map) the local attribute `attr` maps onto.
    pub fn targets(&self, attr: &str) -> Vec<(usize, &AttrMap)> {
        self.parts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                p.attrs
                    .iter()
                    .filter(|a| a.local == attr)
                    .map(move |a| (i, a))
            })
            .collect()
    }

    /// Whether the local attribute `attr` is mapped at all.
    pub fn maps(&self, attr: &str) -> bool {
        !self.targets(attr).is_empty()
    }

    /// Exports a local tuple (values in the local relation's attribute order)
    /// as one tuple per part (values in the part's attribute order), converted
    /// and checked against the global types. Non-mapped attributes never
    /// appear in the result.
    pub fn export(&self, tuple: &[Value]) -> Result<Vec<Vec<Value>>> {
        self.parts
            .iter()
            .map(|p| {
                p.attrs
                    .iter()
                    .map(|a| {
                        let pos = self.local.position(&a.local).ok_or_else(|| {
                            Error::Mapping(format!(
                                "attribute {}.{} vanished",
                                self.local.name, a.local
                            ))
                        })?;
                        let v = tuple.get(pos).cloned().unwrap_or(Value::Null);
                        let what = format!("{}.{}", p.global, a.global);
                        match a.to_global {
                            Some(c) => c.apply(&v, a.global_type, &what),
                            None => a
                                .global_type
                                .check(v, &what)
                                .map_err(|e| Error::Conversion(e.to_string())),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Maps a reassembled global tuple back to a local tuple: `parts[i]` holds
    /// part *i*'s values in its attribute order, or `None` where that part has
    /// no tuple (another site that maps fewer parts). Attributes the site does
    /// not map are NULL. A key stored in several parts is taken from the first
    /// part that has it.
    pub fn map_back(&self, parts: &[Option<Vec<Value>>]) -> Result<Vec<Value>> {
        let mut out = vec![Value::Null; self.local.attributes.len()];
        let mut filled = vec![false; out.len()];
        for (part, values) in self.parts.iter().zip(parts) {
            let Some(values) = values else { continue };
            for (a, v) in part.attrs.iter().zip(values) {
                let Some(pos) = self.local.position(&a.local) else {
                    continue;
                };
                if filled[pos] && !v.is_null() && !out[pos].is_null() {
                    continue;
                }
                let what = format!("{}.{}", self.local.name, a.local);
                out[pos] = match a.to_local {
                    Some(c) => c.apply(v, a.local_type, &what)?,
                    None => a
                        .local_type
                        .check(v.clone(), &what)
                        .map_err(|e| Error::Conversion(e.to_string()))?,
                };
                filled[pos] = true;
            }
        }
        Ok(out)
    }
}

/// A site's whole mapping, validated against its local catalog and the global
/// catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteMapping {
    relations: BTreeMap<String, RelationMapping>,
}

impl SiteMapping {
    /// Builds and validates the mapping from its rows.
    pub fn new(
        rows: &[MappingRow],
        qualifications: &[QualificationRow],
        local: &Catalog,
        global: &Catalog,
    ) -> Result<SiteMapping> {
        let mut relations: BTreeMap<String, RelationMapping> = BTreeMap::new();
        // (local relation, global relation, global attribute) -> row, to catch duplicates.
        let mut global_seen: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        let mut local_seen: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        for r in rows {
            let err = |m: String| Error::Mapping(format!("mapping row {}: {m}", r.row));
            let lrel = local
                .relation(&r.local_relation)
                .ok_or_else(|| err(format!("unknown local relation {}", r.local_relation)))?;
            let lattr = lrel.attribute(&r.local_attribute).ok_or_else(|| {
                err(format!(
                    "unknown local attribute {}.{}",
                    r.local_relation, r.local_attribute
                ))
            })?;
            let grel = global
                .relation(&r.global_relation)
                .ok_or_else(|| err(format!("unknown global relation {}", r.global_relation)))?;
            let gattr = grel.attribute(&r.global_attribute).ok_or_else(|| {
                err(format!(
                    "unknown global attribute {}.{}",
                    r.global_relation, r.global_attribute
                ))
            })?;
            let gkey = (
                r.local_relation.clone(),
                r.global_relation.clone(),
                r.global_attribute.clone(),
            );
            if let Some(prev) = global_seen.insert(gkey, r.row) {
                return Err(err(format!(
                    "global attribute {}.{} is already mapped from {} in row {prev}",
                    r.global_relation, r.global_attribute, r.local_relation
                )));
            }
            let lkey = (
                r.local_relation.clone(),
                r.local_attribute.clone(),
                r.global_relation.clone(),
            );
            if let Some(prev) = local_seen.insert(lkey, r.row) {
                return Err(err(format!(
                    "{}.{} is mapped twice onto {} (rows {prev} and {})",
                    r.local_relation, r.local_attribute, r.global_relation, r.row
                )));
            }
            let conv = |name: &Option<String>| -> Result<Option<Conversion>> {
                name.as_ref()
                    .map(|n| {
                        Conversion::by_name(n).ok_or_else(|| {
                            err(format!(
                                "unknown conversion function {n} (known: {})",
                                Conversion::NAMES.join(", ")
                            ))
                        })
                    })
                    .transpose()
            };
            let (to_global, to_local) = (conv(&r.to_global)?, conv(&r.to_local)?);
            let (lt, gt) = (lattr.ty, gattr.ty);
            let names = format!(
                "{}.{} is {lt} but {}.{} is {gt}",
                r.local_relation, r.local_attribute, r.global_relation, r.global_attribute
            );
            match (to_global, to_local) {
                (None, None) if lt != gt => {
                    return Err(err(format!("{names}: name a conversion function each way")));
                }
                (Some(tg), Some(tl)) => {
                    if lt == gt {
                        return Err(err(format!(
                            "{}.{} and {}.{} are both {lt}: no conversion is needed",
                            r.local_relation,
                            r.local_attribute,
                            r.global_relation,
                            r.global_attribute
                        )));
                    }
                    if !tg.fits(lt, gt) || !tl.fits(gt, lt) {
                        return Err(err(format!(
                            "{names}: {} / {} do not convert between these types",
                            tg.name(),
                            tl.name()
                        )));
                    }
                }
                _ => {}
            }
            let rm = relations
                .entry(r.local_relation.clone())
                .or_insert_with(|| RelationMapping {
                    local: lrel.clone(),
                    parts: Vec::new(),
                    split: Split::None,
                });
            let map = AttrMap {
                local: r.local_attribute.clone(),
                local_type: lt,
                global: r.global_attribute.clone(),
                global_type: gt,
                to_global,
                to_local,
            };
            match rm.parts.iter_mut().find(|p| p.global == r.global_relation) {
                Some(p) => p.attrs.push(map),
                None => rm.parts.push(Part {
                    global: r.global_relation.clone(),
                    attrs: vec![map],
                }),
            }
        }
        for q in qualifications {
            let rm = relations.get_mut(&q.local_relation).ok_or_else(|| {
                Error::Mapping(format!(
                    "qualification row {}: {} has no mapping rows",
                    q.row, q.local_relation
                ))
            })?;
            if rm.parts.len() < 2 {
                return Err(Error::Mapping(format!(
                    "qualification row {}: {} maps onto one global relation only; nothing to join",
                    q.row, q.local_relation
                )));
            }
            if rm.split != Split::None {
                return Err(Error::Mapping(format!(
                    "qualification row {}: {} already has a qualification",
                    q.row, q.local_relation
                )));
            }
            rm.split = split_from(q, rm)?;
        }
        for rm in relations.values() {
            check_relation(rm, global)?;
        }
        Ok(SiteMapping { relations })
    }

    /// Builds the mapping from the text of the mapping and
    /// mapping-qualification files (see [`parse_mapping_rows`]).
    pub fn from_text(
        mapping: &str,
        qualification: &str,
        local: &Catalog,
        global: &Catalog,
    ) -> Result<SiteMapping> {
        let rows = parse_mapping_rows(mapping)?;
        let quals = parse_qualification_rows(qualification)?;
        SiteMapping::new(&rows, &quals, local, global)
    }

    /// The mapping of local relation `name`, if it is mapped.
    pub fn relation(&self, name: &str) -> Option<&RelationMapping> {
        self.relations.get(name)
    }

    /// All mapped relations, by local name.
    pub fn relations(&self) -> impl Iterator<Item = &RelationMapping> {
        self.relations.values()
    }
}

fn check_relation(rm: &RelationMapping, global: &Catalog) -> Result<()> {
    let name = &rm.local.name;
    let globals: Vec<&str> = rm.parts.iter().map(|p| p.global.as_str()).collect();
    if rm.parts.len() > 1 && rm.split == Split::None {
        return Err(Error::Mapping(format!(
            "{name} maps onto {} but has no mapping-qualification row to join them \
             (a key join such as {a}.key = {b}.key, or {a}.tuple_id = {b}.main_tuple_id)",
            globals.join(" and "),
            a = globals[0],
            b = globals[1]
        )));
    }
    for p in &rm.parts {
        let Some(g) = global.relation(&p.global) else {
            continue;
        };
        for k in &g.key {
            if !p.attrs.iter().any(|a| &a.global == k) {
                return Err(Error::Mapping(format!(
                    "{name} does not map key attribute {}.{k}: its tuples could not be told apart",
                    p.global
                )));
            }
        }
    }
    // An attribute stored in several parts must be the split's key.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for p in &rm.parts {
        for a in &p.attrs {
            if let Some(first) = seen.insert(&a.local, &p.global) {
                let is_key = match &rm.split {
                    Split::Key(k) => k.contains(&a.local),
                    Split::MainTupleId(_) => true,
                    Split::None => false,
                };
                if !is_key {
                    return Err(Error::Mapping(format!(
                        "{name}.{} is mapped onto both {first}.{} and {}.{}; only a split's key may be stored twice",
                        a.local, a.local, p.global, a.global
                    )));
                }
            }
        }
    }
    Ok(())
}

fn split_from(q: &QualificationRow, rm: &RelationMapping) -> Result<Split> {
    let err = |m: String| Error::Mapping(format!("qualification row {}: {m}", q.row));
    let part_index = |rel: &str| {
        rm.parts
            .iter()
            .position(|p| p.global == rel)
            .ok_or_else(|| {
                err(format!(
                    "{rel} is not one of the global relations {} maps onto",
                    rm.local.name
                ))
            })
    };
    let mut key = Vec::new();
    let mut main: Option<usize> = None;
    let mut joined = vec![false; rm.parts.len()];
    let normalised = q.qualification.replace('-', "_").to_lowercase();
    for conjunct in normalised.split(" and ") {
        let (l, r) = conjunct.split_once('=').ok_or_else(|| {
            err(format!(
                "expected a conjunction of equalities, found {:?}",
                conjunct.trim()
            ))
        })?;
        let side = |s: &str| -> Result<(usize, String)> {
            let ident =
                |x: &str| !x.is_empty() && x.chars().all(|c| c.is_alphanumeric() || c == '_');
            match s.trim().split_once('.') {
                Some((rel, attr)) if ident(rel) && ident(attr) => {
                    Ok((part_index(rel)?, attr.to_string()))
                }
                _ => Err(err(format!(
                    "expected relation.attribute, found {:?}",
                    s.trim()
                ))),
            }
        };
        let ((li, la), (ri, ra)) = (side(l)?, side(r)?);
        if li == ri {
            return Err(err(format!(
                "{} is joined with itself",
                rm.parts[li].global
            )));
        }
        let tid = |a: &str| a == "tuple_id";
        let mtid = |a: &str| a == "main_tuple_id";
        if (tid(&la) && mtid(&ra)) || (mtid(&la) && tid(&ra)) {
            let (m, other) = if tid(&la) { (li, ri) } else { (ri, li) };
            if main.is_some_and(|x| x != m) {
                return Err(err("two different main relations".into()));
            }
            main = Some(m);
            joined[m] = true;
            joined[other] = true;
            continue;
        }
        let from = |i: usize, attr: &str| {
            rm.parts[i]
                .attrs
                .iter()
                .find(|a| a.global == attr)
                .map(|a| a.local.clone())
        };
        match (from(li, &la), from(ri, &ra)) {
            (Some(a), Some(b)) if a == b => {
                if !key.contains(&a) {
                    key.push(a);
                }
                joined[li] = true;
                joined[ri] = true;
            }
            _ => {
                return Err(err(format!(
                    "{}.{la} = {}.{ra} does not join the parts on a key: both sides must be mapped from the same attribute of {}",
                    rm.parts[li].global, rm.parts[ri].global, rm.local.name
                )));
            }
        }
    }
    if main.is_some() && !key.is_empty() {
        return Err(err("mixes a key join with a main tuple id join".into()));
    }
    if let Some(i) = joined.iter().position(|j| !j) {
        return Err(err(format!(
            "{} is not joined to the other parts",
            rm.parts[i].global
        )));
    }
    Ok(match main {
        Some(m) => Split::MainTupleId(m),
        None => Split::Key(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogs() -> (Catalog, Catalog) {
        let local = Catalog::from_ddl(
            "CREATE TABLE patient (pno i4 PRIMARY KEY, name c20, addr c30, dob i4, gp i2);
             CREATE TABLE visit (vno i4 PRIMARY KEY, pno i4, time c5);
             CREATE TABLE person (name c20, phone c10, sex c1);",
        )
        .unwrap();
        let global = Catalog::from_ddl(
            "CREATE TABLE pat_addr (pno i4 PRIMARY KEY, name c20, addr c30, gp i4);
             CREATE TABLE pat_other (pno i4 PRIMARY KEY, dob i4);
             CREATE TABLE visit (vno i4 PRIMARY KEY, pno i4, \"when\" c5);
             CREATE TABLE pat_phone (name c20, phone c12);
             CREATE TABLE pat_sex (name c20, sex c1);",
        )
        .unwrap();
        (local, global)
    }

    const GOOD: &str = "
        patient pno  pat_addr pno
        patient name pat_addr name
        patient addr pat_addr addr
        patient gp   pat_addr gp  int_widen int_narrow
        patient pno  pat_other pno
        patient dob  pat_other dob
        visit   vno  visit vno
        visit   time visit when   # renamed
    ";

    fn build(rows: &str, quals: &str) -> Result<SiteMapping> {
        let (l, g) = catalogs();
        SiteMapping::new(
            &parse_mapping_rows(rows)?,
            &parse_qualification_rows(quals)?,
            &l,
            &g,
        )
    }

    fn err(rows: &str, quals: &str) -> String {
        build(rows, quals).unwrap_err().to_string()
    }

    #[test]
    fn a_good_mapping_builds() {
        let m = build(GOOD, "patient pat-addr.pno = pat-other.pno").unwrap();
        let p = m.relation("patient").unwrap();
        assert_eq!(p.split, Split::Key(vec!["pno".into()]));
        assert_eq!(p.parts.len(), 2);
        assert_eq!(p.targets("pno").len(), 2);
        let parts = p
            .export(&[
                Value::Int(7),
                Value::text("Jones"),
                Value::text("1 High St"),
                Value::Int(19340512),
                Value::Int(1004),
            ])
            .unwrap();
        assert_eq!(parts[1], vec![Value::Int(7), Value::Int(19340512)]);
        let back = p.map_back(&[Some(parts[0].clone()), None]).unwrap();
        assert_eq!(back[0], Value::Int(7));
        assert_eq!(back[3], Value::Null, "dob comes from the missing part");
        assert_eq!(back[4], Value::Int(1004));
        let m = build(
            "person name pat_phone name\nperson phone pat_phone phone char_widen char_narrow\n\
             person name pat_sex name\nperson sex pat_sex sex",
            "person pat_phone.tuple_id = pat_sex.main_tuple_id",
        )
        .unwrap();
        assert_eq!(m.relation("person").unwrap().split, Split::MainTupleId(0));
    }

    #[test]
    fn map_back_refuses_values_that_do_not_fit() {
        let m = build(GOOD, "patient pat_addr.pno = pat_other.pno").unwrap();
        let p = m.relation("patient").unwrap();
        let e = p
            .map_back(&[
                Some(vec![
                    Value::Int(1),
                    Value::Null,
                    Value::Null,
                    Value::Int(40000),
                ]),
                None,
            ])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "int_narrow cannot convert: value 40000 does not fit patient.gp (i2)"
        );
    }

    #[test]
    fn each_kind_of_bad_row_is_named() {
        let q = "patient pat_addr.pno = pat_other.pno";
        assert_eq!(
            err("pateint pno pat_addr pno", ""),
            "mapping row 1: unknown local relation pateint"
        );
        assert_eq!(
            err("patient pnum pat_addr pno", ""),
            "mapping row 1: unknown local attribute patient.pnum"
        );
        assert_eq!(
            err("patient pno pat_adr pno", ""),
            "mapping row 1: unknown global relation pat_adr"
        );
        assert_eq!(
            err("patient pno pat_addr pnum", ""),
            "mapping row 1: unknown global attribute pat_addr.pnum"
        );
        assert_eq!(
            err("patient pno pat_addr pno\npatient dob pat_addr pno", ""),
            "mapping row 2: global attribute pat_addr.pno is already mapped from patient in row 1"
        );
        assert_eq!(
            err(
                "patient pno pat_addr pno\npatient name pat_addr name\npatient name pat_addr addr",
                ""
            ),
            "mapping row 3: patient.name is mapped twice onto pat_addr (rows 2 and 3)"
        );
        assert_eq!(
            err("patient pno pat_addr pno\npatient gp pat_addr gp", ""),
            "mapping row 2: patient.gp is i2 but pat_addr.gp is i4: name a conversion function each way"
        );
        assert_eq!(
            err(
                "patient pno pat_addr pno\npatient gp pat_addr gp int_narrow int_widen",
                ""
            ),
            "mapping row 2: patient.gp is i2 but pat_addr.gp is i4: int_narrow / int_widen do not convert between these types"
        );
        assert_eq!(
            err(
                "patient pno pat_addr pno\npatient gp pat_addr gp widen narrow",
                ""
            ),
            "mapping row 2: unknown conversion function widen (known: int_widen, int_narrow, char_widen, char_narrow)"
        );
        assert_eq!(
            err("patient pno pat_addr pno int_widen int_narrow", ""),
            "mapping row 1: patient.pno and pat_addr.pno are both i4: no conversion is needed"
        );
        assert_eq!(
            err("patient pno pat_addr", ""),
            "mapping row 1: expected 4 or 6 fields, found 3"
        );
        assert_eq!(
            err("patient pno pat_addr pno int_widen", ""),
            "mapping row 1: a conversion needs both functions, to_global and to_local"
        );
        assert_eq!(
            err(GOOD, ""),
            "patient maps onto pat_addr and pat_other but has no mapping-qualification row to join them \
             (a key join such as pat_addr.key = pat_other.key, or pat_addr.tuple_id = pat_other.main_tuple_id)"
        );
        assert_eq!(
            err(GOOD, "patient pat_addr.name = pat_other.dob"),
            "qualification row 1: pat_addr.name = pat_other.dob does not join the parts on a key: \
             both sides must be mapped from the same attribute of patient"
        );
        assert_eq!(
            err(GOOD, "patient pat_addr.pno = visit.vno"),
            "qualification row 1: visit is not one of the global relations patient maps onto"
        );
        assert_eq!(
            err(GOOD, &format!("{q}\nvisit visit.vno = visit.vno")),
            "qualification row 2: visit maps onto one global relation only; nothing to join"
        );
        assert_eq!(
            err("visit time visit when", ""),
            "visit does not map key attribute visit.vno: its tuples could not be told apart"
        );
        assert_eq!(
            err(
                "person name pat_phone name\nperson name pat_sex name",
                "person pat_phone.name == pat_sex.name"
            ),
            "qualification row 1: expected relation.attribute, found \"= pat_sex.name\""
        );
    }
}
