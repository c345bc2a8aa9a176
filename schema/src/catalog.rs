//! The relation catalog, read from SQL DDL.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use sqlparser::ast::{CharacterLength, ColumnOption, DataType, Expr, Statement, TableConstraint};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::{Error, Result, ValueType};

/// SQL keywords that cannot be bare attribute names (the thesis' global
/// `visit.when` is one).
const RESERVED: &[&str] = &[
    "all",
    "and",
    "as",
    "between",
    "by",
    "case",
    "check",
    "create",
    "default",
    "delete",
    "distinct",
    "else",
    "end",
    "from",
    "group",
    "having",
    "in",
    "index",
    "insert",
    "into",
    "is",
    "join",
    "like",
    "limit",
    "not",
    "null",
    "on",
    "or",
    "order",
    "primary",
    "references",
    "select",
    "set",
    "table",
    "then",
    "to",
    "union",
    "unique",
    "update",
    "using",
    "values",
    "when",
    "where",
];

/// An identifier as SQL text, double-quoted when it is a keyword.
pub fn sql_ident(name: &str) -> String {
    if RESERVED.contains(&name) {
        format!("\"{name}\"")
    } else {
        name.to_string()
    }
}

/// One attribute of a relation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attribute {
    /// Lower-case name.
    pub name: String,
    /// Type and width.
    pub ty: ValueType,
    /// Declared `NOT NULL` (or part of the key).
    pub not_null: bool,
}

/// A relation: its attributes in order and its unique key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Relation {
    /// Lower-case name.
    pub name: String,
    /// Attributes in declaration order.
    pub attributes: Vec<Attribute>,
    /// The attributes of the unique key; empty when the relation declares none
    /// (the thesis' non-unique-key relations).
    pub key: Vec<String>,
}

impl Relation {
    /// The attribute called `name`, if any.
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// Position of the attribute called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.attributes.iter().position(|a| a.name == name)
    }
}

/// A set of relations: a site's local schema or the global schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Catalog {
    relations: BTreeMap<String, Relation>,
}

impl Catalog {
    /// Reads `CREATE TABLE` statements. Types are SQL (`SMALLINT`, `INTEGER`,
    /// `REAL`, `CHAR(n)`, `VARCHAR(n)`) or the thesis' own (`i2`, `i4`, `f4`,
    /// `c22`); keys come from `PRIMARY KEY`, on a column or the table.
    pub fn from_ddl(ddl: &str) -> Result<Catalog> {
        let statements = Parser::parse_sql(&GenericDialect {}, ddl)
            .map_err(|e| Error::Parse(format!("schema: {e}")))?;
        let mut catalog = Catalog::default();
        for statement in statements {
            let Statement::CreateTable(table) = statement else {
                return Err(Error::Parse(format!(
                    "schema: only CREATE TABLE is allowed, found: {statement}"
                )));
            };
            let name = table.name.to_string().to_lowercase();
            let mut attributes = Vec::new();
            let mut key = Vec::new();
            for column in &table.columns {
                let attr_name = column.name.value.to_lowercase();
                let ty = value_type(&column.data_type).ok_or_else(|| {
                    Error::Parse(format!(
                        "schema: unsupported type {} for {name}.{attr_name} (use i2, i4, f4 or cN)",
                        column.data_type
                    ))
                })?;
                let mut not_null = false;
                for option in &column.options {
                    match &option.option {
                        ColumnOption::NotNull => not_null = true,
                        ColumnOption::PrimaryKey(_) => {
                            not_null = true;
                            key.push(attr_name.clone());
                        }
                        _ => {}
                    }
                }
                if attributes.iter().any(|a: &Attribute| a.name == attr_name) {
                    return Err(Error::Catalog(format!(
                        "schema: attribute {name}.{attr_name} is declared twice"
                    )));
                }
                attributes.push(Attribute {
                    name: attr_name,
                    ty,
                    not_null,
                });
            }
            for constraint in &table.constraints {
                if let TableConstraint::PrimaryKey(pk) = constraint {
                    for column in &pk.columns {
                        let Expr::Identifier(ident) = &column.column.expr else {
                            return Err(Error::Parse(format!(
                                "schema: primary key of {name} must list attribute names"
                            )));
                        };
                        key.push(ident.value.to_lowercase());
                    }
                }
            }
            for k in &key {
                let attr = attributes
                    .iter_mut()
                    .find(|a| &a.name == k)
                    .ok_or_else(|| {
                        Error::Catalog(format!("schema: key attribute {name}.{k} is not declared"))
                    })?;
                attr.not_null = true;
            }
            let relation = Relation {
                name: name.clone(),
                attributes,
                key,
            };
            if catalog.relations.insert(name.clone(), relation).is_some() {
                return Err(Error::Catalog(format!(
                    "schema: relation {name} is declared twice"
                )));
            }
        }
        Ok(catalog)
    }

    /// Reads a DDL file.
    pub fn from_file(path: &Path) -> Result<Catalog> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Catalog::from_ddl(&text).map_err(|e| Error::Parse(format!("{}: {e}", path.display())))
    }

    /// The relation called `name`, if any.
    pub fn relation(&self, name: &str) -> Option<&Relation> {
        self.relations.get(name)
    }

    /// All relations, by name.
    pub fn relations(&self) -> impl Iterator<Item = &Relation> {
        self.relations.values()
    }

    /// A short fingerprint of the catalog (FNV-1a, 64 bits, of
    /// [`Catalog::to_ddl`], in hex): two parties holding the same relations,
    /// attributes, types and keys get the same fingerprint.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.to_ddl().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The DDL that creates these relations, in the SQL type names.
    pub fn to_ddl(&self) -> String {
        let mut out = String::new();
        for r in self.relations.values() {
            let mut cols: Vec<String> = r
                .attributes
                .iter()
                .map(|a| {
                    let nn = if a.not_null { " NOT NULL" } else { "" };
                    format!("  {} {}{nn}", sql_ident(&a.name), a.ty.sql_name())
                })
                .collect();
            if !r.key.is_empty() {
                let key: Vec<String> = r.key.iter().map(|k| sql_ident(k)).collect();
                cols.push(format!("  PRIMARY KEY ({})", key.join(", ")));
            }
            out.push_str(&format!(
                "CREATE TABLE {} (\n{}\n);\n",
                sql_ident(&r.name),
                cols.join(",\n")
            ));
        }
        out
    }
}

fn value_type(dt: &DataType) -> Option<ValueType> {
    let width = |len: &Option<CharacterLength>| match len {
        Some(CharacterLength::IntegerLength { length, .. }) => u16::try_from(*length).ok(),
        _ => None,
    };
    match dt {
        DataType::SmallInt(_) | DataType::Int2(_) => Some(ValueType::Int2),
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => Some(ValueType::Int4),
        DataType::Real | DataType::Float4 => Some(ValueType::Float4),
        DataType::Char(len) | DataType::Character(len) | DataType::Varchar(len) => {
            width(len).filter(|n| *n > 0).map(ValueType::Char)
        }
        DataType::Custom(name, args) if args.is_empty() => {
            ValueType::from_thesis(&name.to_string().to_lowercase())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sql_and_thesis_types_and_keys() {
        let c = Catalog::from_ddl(
            "CREATE TABLE visit_rep (vno INTEGER, line_no i2, line c80, PRIMARY KEY (vno, line_no));
             CREATE TABLE doctor (code i4 PRIMARY KEY, phone CHAR(10) NOT NULL, fee REAL);",
        )
        .unwrap();
        let v = c.relation("visit_rep").unwrap();
        assert_eq!(v.key, vec!["vno", "line_no"]);
        assert_eq!(v.attribute("line").unwrap().ty, ValueType::Char(80));
        assert_eq!(v.attribute("line_no").unwrap().ty, ValueType::Int2);
        assert!(v.attribute("vno").unwrap().not_null);
        let d = c.relation("doctor").unwrap();
        assert_eq!(d.key, vec!["code"]);
        assert_eq!(d.attribute("fee").unwrap().ty, ValueType::Float4);
        assert!(d.attribute("phone").unwrap().not_null);
        // The DDL we print reads back the same.
        assert_eq!(Catalog::from_ddl(&c.to_ddl()).unwrap(), c);
    }

    #[test]
    fn bad_schemas_say_what_is_wrong() {
        let e = Catalog::from_ddl("CREATE TABLE t (a TEXT)").unwrap_err();
        assert_eq!(
            e.to_string(),
            "schema: unsupported type TEXT for t.a (use i2, i4, f4 or cN)"
        );
        let e = Catalog::from_ddl("CREATE TABLE t (a i4, a i2)").unwrap_err();
        assert_eq!(e.to_string(), "schema: attribute t.a is declared twice");
        let e = Catalog::from_ddl("CREATE TABLE t (a i4, PRIMARY KEY (b))").unwrap_err();
        assert_eq!(e.to_string(), "schema: key attribute t.b is not declared");
        let e = Catalog::from_ddl("DROP TABLE t").unwrap_err();
        assert!(e.to_string().contains("only CREATE TABLE"), "{e}");
        assert!(Catalog::from_ddl("CREATE TABLE t (a i4); CREATE TABLE t (b i4)").is_err());
    }
}
