//! QUEL front end: the thesis' query language, parsed into the [`ir`](crate::ir).
//!
//! The thesis writes its queries in Ingres QUEL (chapters 4, 5 and 7), so the
//! dialect accepted here is that QUEL as the thesis prints it, letting its
//! queries be typed as they stand:
//!
//! * `range of v is r`; `retrieve [unique] targets [where q] [sort by k[:a|:d], ...]`
//!   (the target list with or without parentheses); `append [to] r (a = e, ...)`;
//!   `replace v (a = e, ...) [where q]`; `delete v [where q]`;
//!   `define snapshot s [(a, ...)] as retrieve ...`. Statements may be separated by `;`.
//! * Hyphenated names (`pat-addr`, `tuple-id`) read as `pat_addr`, `tuple_id`,
//!   because the SQL every site runs has no hyphens in names: a `-` directly
//!   between a name character and a letter belongs to the name; any other `-` is
//!   minus (`v.date-1`, `a - b`).
//! * A variable never declared with `range of` ranges over the relation of its own
//!   name, as the thesis writes `patient.name` without a declaration. A name
//!   followed by `.` is always a variable, so keywords stay usable as names.
//! * Double-quoted strings with `\` escapes as in QUEL; single-quoted SQL strings
//!   (with `''`) as a convenience; `is [not] null` as an extension; Ingres'
//!   `countu`, `sumu`, `avgu` as `DISTINCT` aggregates. A minus sign before a number
//!   is folded into the constant, so `v.age > -5` compares with a constant.
//!
//! Not handled (`Error::Unsupported`): `retrieve into`, `append` from other
//! relations, aggregates with `by` or their own `where`, `define` of anything but a
//! snapshot. Meaning is the IR's, which is SQLite's: an aggregate in a target list
//! ranges over the qualified tuples (QUEL evaluates it apart from the outer
//! qualification), and `*`, `?`, `[` in strings are plain characters, not QUEL
//! patterns. Parentheses and calls nest at most 64 deep and an expression tree
//! at most 256, so no text can exhaust a stack.

use std::collections::{HashMap, HashSet};
use std::fmt;

use snaps_schema::Value;

use crate::ir::{
    BinOp, ColumnRef, Delete, Expr, Insert, OrderItem, Range, Select, Statement, Target, Update,
};
use crate::{Error, Result};

/// Words that start a statement.
const STATEMENT_KEYWORDS: &[&str] = &["range", "retrieve", "append", "replace", "delete", "define"];

/// Deepest expression tree accepted, so that no input can exhaust the stack of
/// whatever later walks the tree (its printing, its decomposition).
const MAX_DEPTH: usize = 256;

/// Deepest nesting of parentheses and function calls accepted: each level costs
/// this parser some stack (a few kilobytes in a debug build).
const MAX_NESTING: usize = 64;

/// Binding strengths of the operators, loosest first; unary minus binds more
/// strongly than all of them.
const OR: u8 = 1;
const AND: u8 = 2;
const NOT: u8 = 3;
const COMPARE: u8 = 4;
const ADD: u8 = 5;
const MULTIPLY: u8 = 6;

/// True if the text starts (after whitespace and `/* */` comments) with a QUEL
/// statement keyword: `range`, `retrieve`, `append`, `define`, `replace` not
/// followed by `into` (SQLite's `REPLACE INTO`), or `delete` followed by a name
/// other than `from` (SQL's `DELETE FROM`). Case-insensitive.
pub fn looks_like_quel(text: &str) -> bool {
    let mut lexer = Lexer::new(text);
    let mut word = || match lexer.next_token() {
        Ok(Token {
            tok: Tok::Ident(w), ..
        }) => Some(w),
        _ => None,
    };
    match word().as_deref() {
        Some("range" | "retrieve" | "append" | "define") => true,
        Some("replace") => word().is_some_and(|w| w != "into"),
        Some("delete") => word().is_some_and(|w| w != "from"),
        _ => false,
    }
}

/// A QUEL session: `range of v is r` declarations persist across calls, as a
/// client connection sends its statements one at a time.
#[derive(Debug, Clone, Default)]
pub struct QuelSession {
    /// Range variable -> relation.
    ranges: HashMap<String, String>,
}

impl QuelSession {
    /// A session with no range declarations.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses one or more QUEL statements (optionally separated by `;`).
    /// `range of` statements only update the session and produce no
    /// [`Statement`]. When the text has an error the session is left unchanged.
    pub fn parse(&mut self, text: &str) -> Result<Vec<Statement>> {
        let (tokens, end) = tokenize(text)?;
        let mut parser = Parser {
            tokens,
            end,
            at: 0,
            ranges: self.ranges.clone(),
            vars: Vec::new(),
            seen: HashSet::new(),
            nesting: 0,
        };
        let statements = parser.statements()?;
        self.ranges = parser.ranges;
        Ok(statements)
    }
}

/// Parses QUEL statements with a fresh session.
pub fn parse(text: &str) -> Result<Vec<Statement>> {
    QuelSession::new().parse(text)
}

fn parse_error(message: String) -> Error {
    Error::Parse(format!("quel: {message}"))
}

fn unsupported(message: String) -> Error {
    Error::Unsupported(format!("quel: {message}"))
}

/// A place in the text, both 1-based; columns count characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A name or keyword, lower case, hyphens made underscores.
    Ident(String),
    Int(i64),
    Float(f64),
    /// A string constant, unescaped.
    Str(String),
    Sym(&'static str),
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// The source text, for messages.
    text: String,
    pos: Pos,
}

impl Token {
    /// How an error message names this token.
    fn found(&self) -> String {
        match &self.tok {
            Tok::End => "end of input".to_string(),
            Tok::Str(s) => format!("string \"{s}\""),
            _ => format!("\"{}\"", self.text),
        }
    }
}

struct Lexer {
    chars: Vec<char>,
    at: usize,
    pos: Pos,
}

impl Lexer {
    fn new(text: &str) -> Lexer {
        Lexer {
            chars: text.chars().collect(),
            at: 0,
            pos: Pos { line: 1, column: 1 },
        }
    }

    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.at.saturating_add(ahead)).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek(0)?;
        self.at += 1;
        if c == '\n' {
            self.pos.line += 1;
            self.pos.column = 1;
        } else {
            self.pos.column += 1;
        }
        Some(c)
    }

    fn skip_blanks(&mut self) -> Result<()> {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(c), _) if c.is_whitespace() => {
                    self.bump();
                }
                (Some('/'), Some('*')) => {
                    let start = self.pos;
                    self.bump();
                    self.bump();
                    loop {
                        match self.bump() {
                            None => {
                                return Err(parse_error(format!(
                                    "unterminated comment starting at {start}"
                                )));
                            }
                            Some('*') if self.peek(0) == Some('/') => {
                                self.bump();
                                break;
                            }
                            Some(_) => {}
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn next_token(&mut self) -> Result<Token> {
        self.skip_blanks()?;
        let pos = self.pos;
        let start = self.at;
        let tok = match self.peek(0) {
            None => Tok::End,
            Some(c) if c.is_ascii_alphabetic() || c == '_' => self.word(),
            Some(c) if c.is_ascii_digit() => self.number(pos)?,
            Some(q @ ('"' | '\'')) => self.string(q, pos)?,
            Some(c) => self.symbol(c, pos)?,
        };
        let text = self
            .chars
            .get(start..self.at)
            .unwrap_or_default()
            .iter()
            .collect();
        Ok(Token { tok, text, pos })
    }

    fn word(&mut self) -> Tok {
        let mut name = String::new();
        while let Some(c) = self.peek(0) {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c.to_ascii_lowercase());
            } else if c == '-' && self.peek(1).is_some_and(|n| n.is_ascii_alphabetic()) {
                name.push('_');
            } else {
                break;
            }
            self.bump();
        }
        Tok::Ident(name)
    }

    fn digits(&mut self, into: &mut String) {
        while let Some(c) = self.peek(0).filter(char::is_ascii_digit) {
            into.push(c);
            self.bump();
        }
    }

    fn number(&mut self, pos: Pos) -> Result<Tok> {
        let mut text = String::new();
        self.digits(&mut text);
        let mut float = false;
        if self.peek(0) == Some('.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            float = true;
            text.push('.');
            self.bump();
            self.digits(&mut text);
        }
        if matches!(self.peek(0), Some('e' | 'E')) {
            let first_digit = if matches!(self.peek(1), Some('+' | '-')) {
                2
            } else {
                1
            };
            if self.peek(first_digit).is_some_and(|c| c.is_ascii_digit()) {
                float = true;
                for _ in 0..first_digit {
                    text.extend(self.bump());
                }
                self.digits(&mut text);
            }
        }
        if !float && let Ok(i) = text.parse::<i64>() {
            return Ok(Tok::Int(i));
        }
        // An integer too big for i64 is kept as a float, as SQLite does.
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Tok::Float(f)),
            _ => Err(parse_error(format!("number {text} is too large at {pos}"))),
        }
    }

    fn string(&mut self, quote: char, pos: Pos) -> Result<Tok> {
        let unterminated = || parse_error(format!("unterminated string starting at {pos}"));
        let mut value = String::new();
        self.bump();
        loop {
            match self.bump() {
                None => return Err(unterminated()),
                Some('\\') => value.push(self.bump().ok_or_else(unterminated)?),
                Some(c) if c == quote => {
                    if quote == '\'' && self.peek(0) == Some('\'') {
                        self.bump();
                        value.push('\'');
                    } else {
                        return Ok(Tok::Str(value));
                    }
                }
                Some(c) => value.push(c),
            }
        }
    }

    fn symbol(&mut self, c: char, pos: Pos) -> Result<Tok> {
        let pair = match (c, self.peek(1)) {
            ('<', Some('=')) => Some("<="),
            ('>', Some('=')) => Some(">="),
            ('<', Some('>')) => Some("<>"),
            ('!', Some('=')) => Some("!="),
            _ => None,
        };
        if let Some(s) = pair {
            self.bump();
            self.bump();
            return Ok(Tok::Sym(s));
        }
        let s = match c {
            '(' => "(",
            ')' => ")",
            ',' => ",",
            '.' => ".",
            '=' => "=",
            '<' => "<",
            '>' => ">",
            '+' => "+",
            '-' => "-",
            '*' => "*",
            '/' => "/",
            '%' => "%",
            ':' => ":",
            ';' => ";",
            _ => return Err(parse_error(format!("unexpected character {c:?} at {pos}"))),
        };
        self.bump();
        Ok(Tok::Sym(s))
    }
}

/// The tokens of `text`, and the end-of-input token after them.
fn tokenize(text: &str) -> Result<(Vec<Token>, Token)> {
    let mut lexer = Lexer::new(text);
    let mut tokens = Vec::new();
    loop {
        let token = lexer.next_token()?;
        if token.tok == Tok::End {
            return Ok((tokens, token));
        }
        tokens.push(token);
    }
}

/// An expression and the depth of its tree.
type Parsed = (Expr, usize);

struct Parser {
    tokens: Vec<Token>,
    end: Token,
    at: usize,
    /// The session's range declarations, as this text changes them.
    ranges: HashMap<String, String>,
    /// Variables the current statement references, in order of first appearance.
    vars: Vec<String>,
    seen: HashSet<String>,
    /// Open parentheses and function calls around the current token.
    nesting: usize,
}

impl Parser {
    fn peek_at(&self, ahead: usize) -> &Token {
        self.tokens
            .get(self.at.saturating_add(ahead))
            .unwrap_or(&self.end)
    }

    fn peek(&self) -> &Token {
        self.peek_at(0)
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if self.at < self.tokens.len() {
            self.at += 1;
        }
        token
    }

    fn sym_at(&self, ahead: usize, s: &str) -> bool {
        matches!(&self.peek_at(ahead).tok, Tok::Sym(t) if *t == s)
    }

    fn eat_sym(&mut self, s: &str) -> bool {
        let hit = self.sym_at(0, s);
        if hit {
            self.advance();
        }
        hit
    }

    fn expect_sym(&mut self, s: &str) -> Result<()> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err(self.expected(&format!("'{s}'")))
        }
    }

    /// True if the next token is the word `k` used as a keyword (not as a
    /// variable, which a `.` would follow).
    fn keyword(&self, k: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(w) if w == k) && !self.sym_at(1, ".")
    }

    fn eat_keyword(&mut self, k: &str) -> bool {
        let hit = self.keyword(k);
        if hit {
            self.advance();
        }
        hit
    }

    fn expect_keyword(&mut self, k: &str) -> Result<()> {
        if self.eat_keyword(k) {
            Ok(())
        } else {
            Err(self.expected(&format!("\"{k}\"")))
        }
    }

    /// A name; `what` says which kind for the error.
    fn name(&mut self, what: &str) -> Result<String> {
        match &self.peek().tok {
            Tok::Ident(w) => {
                let w = w.clone();
                self.advance();
                Ok(w)
            }
            _ => Err(self.expected(what)),
        }
    }

    fn expected(&self, what: &str) -> Error {
        let t = self.peek();
        parse_error(format!("expected {what} at {}, found {}", t.pos, t.found()))
    }

    fn at_statement_start(&self) -> bool {
        STATEMENT_KEYWORDS.iter().any(|k| self.keyword(k))
    }

    fn note_var(&mut self, var: &str) {
        if self.seen.insert(var.to_string()) {
            self.vars.push(var.to_string());
        }
    }

    fn resolve(&self, var: &str) -> Range {
        Range::new(var, self.ranges.get(var).map_or(var, String::as_str))
    }

    /// The current statement's variables other than `except`, resolved.
    fn ranges_except(&self, except: Option<&str>) -> Vec<Range> {
        self.vars
            .iter()
            .filter(|v| Some(v.as_str()) != except)
            .map(|v| self.resolve(v))
            .collect()
    }

    fn statements(&mut self) -> Result<Vec<Statement>> {
        let mut out = Vec::new();
        loop {
            while self.eat_sym(";") {}
            if self.peek().tok == Tok::End {
                return Ok(out);
            }
            self.vars.clear();
            self.seen.clear();
            out.extend(self.statement()?);
            if !(self.eat_sym(";") || self.peek().tok == Tok::End || self.at_statement_start()) {
                return Err(self.expected("the end of the statement"));
            }
        }
    }

    fn statement(&mut self) -> Result<Option<Statement>> {
        let Tok::Ident(word) = &self.peek().tok else {
            return Err(
                self.expected("a statement (range, retrieve, append, replace, delete or define)")
            );
        };
        let word = word.clone();
        let token = self.advance();
        Ok(Some(match word.as_str() {
            "range" => {
                self.range_declaration()?;
                return Ok(None);
            }
            "retrieve" => Statement::Select(self.retrieve()?),
            "append" => self.append()?,
            "replace" => self.replace()?,
            "delete" => self.delete()?,
            "define" => self.define()?,
            _ => {
                return Err(parse_error(format!(
                    "unknown statement \"{}\" at {}",
                    token.text, token.pos
                )));
            }
        }))
    }

    /// `range of v is r`, after `range`.
    fn range_declaration(&mut self) -> Result<()> {
        self.expect_keyword("of")?;
        let var = self.name("a range variable")?;
        self.expect_keyword("is")?;
        let relation = self.name("a relation name")?;
        self.ranges.insert(var, relation);
        Ok(())
    }

    /// A retrieval, after `retrieve`.
    fn retrieve(&mut self) -> Result<Select> {
        if self.keyword("into") {
            let pos = self.peek().pos;
            return Err(unsupported(format!(
                "retrieve into at {pos} is not supported; define snapshot keeps a result"
            )));
        }
        let distinct = self.eat_keyword("unique");
        let targets = self.target_list()?;
        let qual = self.qualification()?;
        let order_by = self.sort_by()?;
        Ok(Select {
            distinct,
            targets,
            ranges: self.ranges_except(None),
            qual,
            order_by,
            ..Select::default()
        })
    }

    fn target_list(&mut self) -> Result<Vec<Target>> {
        let parenthesised = self.eat_sym("(");
        let empty = if parenthesised {
            self.sym_at(0, ")")
        } else {
            self.peek().tok == Tok::End
                || self.sym_at(0, ";")
                || self.keyword("where")
                || self.keyword("sort")
        };
        if empty {
            let t = self.peek();
            return Err(parse_error(format!(
                "empty target list at {}, found {}",
                t.pos,
                t.found()
            )));
        }
        let mut targets = Vec::new();
        loop {
            targets.push(self.target()?);
            if !self.eat_sym(",") {
                break;
            }
        }
        if parenthesised {
            self.expect_sym(")")?;
        }
        Ok(targets)
    }

    fn target(&mut self) -> Result<Target> {
        if let Tok::Ident(var) = &self.peek().tok
            && self.sym_at(1, ".")
            && matches!(&self.peek_at(2).tok, Tok::Ident(a) if a == "all")
        {
            let var = var.clone();
            for _ in 0..3 {
                self.advance();
            }
            self.note_var(&var);
            return Ok(Target::All(Some(var)));
        }
        if let Tok::Ident(name) = &self.peek().tok
            && self.sym_at(1, "=")
        {
            let alias = Some(name.clone());
            self.advance();
            self.advance();
            return Ok(Target::Expr {
                expr: self.expr()?,
                alias,
            });
        }
        Ok(Target::Expr {
            expr: self.expr()?,
            alias: None,
        })
    }

    fn qualification(&mut self) -> Result<Option<Expr>> {
        if self.eat_keyword("where") {
            Ok(Some(self.expr()?))
        } else {
            Ok(None)
        }
    }

    fn sort_by(&mut self) -> Result<Vec<OrderItem>> {
        let mut items = Vec::new();
        if !self.eat_keyword("sort") {
            return Ok(items);
        }
        self.expect_keyword("by")?;
        loop {
            let var_pos = self.peek().pos;
            let name = self.name("a sort key (var.attr or a result name)")?;
            let column = if self.eat_sym(".") {
                let attr = self.attribute(&name, var_pos)?;
                self.note_var(&name);
                ColumnRef {
                    var: Some(name),
                    attr,
                }
            } else {
                ColumnRef {
                    var: None,
                    attr: name,
                }
            };
            let desc = if self.eat_sym(":") {
                let desc = match &self.peek().tok {
                    Tok::Ident(w) if w == "a" || w == "asc" => false,
                    Tok::Ident(w) if w == "d" || w == "desc" => true,
                    _ => return Err(self.expected("a sort direction (a, asc, d or desc)")),
                };
                self.advance();
                desc
            } else {
                false
            };
            items.push(OrderItem {
                expr: Expr::Column(column),
                desc,
            });
            if !self.eat_sym(",") {
                return Ok(items);
            }
        }
    }

    /// The attribute after `var.`; `all` is refused (it is a whole target only).
    fn attribute(&mut self, var: &str, var_pos: Pos) -> Result<String> {
        let attr = self.name("an attribute name")?;
        if attr == "all" {
            return Err(parse_error(format!(
                "\"{var}.all\" at {var_pos} is only allowed in a target list"
            )));
        }
        Ok(attr)
    }

    /// `(attr = expr, ...)`.
    fn assignments(&mut self) -> Result<Vec<(String, Expr)>> {
        self.expect_sym("(")?;
        let mut out = Vec::new();
        let mut names = HashSet::new();
        loop {
            let pos = self.peek().pos;
            let attr = self.name("an attribute name")?;
            if !names.insert(attr.clone()) {
                return Err(parse_error(format!(
                    "attribute \"{attr}\" is assigned twice at {pos}"
                )));
            }
            self.expect_sym("=")?;
            out.push((attr, self.expr()?));
            if !self.eat_sym(",") {
                break;
            }
        }
        self.expect_sym(")")?;
        Ok(out)
    }

    /// `append [to] r (attr = value, ...)`, after `append`.
    fn append(&mut self) -> Result<Statement> {
        if self.keyword("to") && matches!(self.peek_at(1).tok, Tok::Ident(_)) {
            self.advance();
        }
        let relation = self.name("a relation name")?;
        let assignments = self.assignments()?;
        let refused = |why: String| {
            unsupported(format!(
                "append to {relation} from other relations is not supported ({why})"
            ))
        };
        if self.keyword("where") {
            return Err(refused(format!("where clause at {}", self.peek().pos)));
        }
        for (attr, value) in &assignments {
            let mut first = None;
            value.visit_columns(&mut |c| {
                first.get_or_insert_with(|| c.to_string());
            });
            if let Some(column) = first {
                return Err(refused(format!("the value of {attr} uses {column}")));
            }
        }
        let (columns, values) = assignments.into_iter().unzip();
        Ok(Statement::Insert(Insert {
            relation,
            columns,
            rows: vec![values],
        }))
    }

    /// `replace v (attr = value, ...) [where q]`, after `replace`.
    fn replace(&mut self) -> Result<Statement> {
        let var = self.name("a range variable")?;
        let assignments = self.assignments()?;
        let qual = self.qualification()?;
        Ok(Statement::Update(Update {
            target: self.resolve(&var),
            others: self.ranges_except(Some(&var)),
            assignments,
            qual,
        }))
    }

    /// `delete v [where q]`, after `delete`.
    fn delete(&mut self) -> Result<Statement> {
        if self.keyword("from") {
            return Err(self.expected("a range variable (\"delete from\" is sql)"));
        }
        let var = self.name("a range variable")?;
        let qual = self.qualification()?;
        Ok(Statement::Delete(Delete {
            target: self.resolve(&var),
            others: self.ranges_except(Some(&var)),
            qual,
        }))
    }

    /// `define snapshot s [(attr, ...)] as retrieve ...`, after `define`.
    fn define(&mut self) -> Result<Statement> {
        if !self.eat_keyword("snapshot") {
            if let Tok::Ident(what) = &self.peek().tok {
                return Err(unsupported(format!(
                    "define {what} at {} is not supported; only define snapshot is",
                    self.peek().pos
                )));
            }
            return Err(self.expected("\"snapshot\""));
        }
        let pos = self.peek().pos;
        let name = self.name("a snapshot name")?;
        let mut columns = Vec::new();
        if self.eat_sym("(") {
            loop {
                columns.push(self.name("an attribute name")?);
                if !self.eat_sym(",") {
                    break;
                }
            }
            self.expect_sym(")")?;
        }
        self.expect_keyword("as")?;
        self.expect_keyword("retrieve")?;
        let query = self.retrieve()?;
        let has_all = query.targets.iter().any(|t| matches!(t, Target::All(_)));
        if !columns.is_empty() && !has_all && columns.len() != query.targets.len() {
            return Err(parse_error(format!(
                "snapshot {name} at {pos} names {} attributes but its target list has {}",
                columns.len(),
                query.targets.len()
            )));
        }
        Ok(Statement::DefineSnapshot {
            name,
            columns,
            query,
        })
    }

    fn expr(&mut self) -> Result<Expr> {
        Ok(self.operand(OR)?.0)
    }

    /// The depth of a node over children at most `depth` deep.
    fn deeper(&self, depth: usize, pos: Pos) -> Result<usize> {
        if depth >= MAX_DEPTH {
            return Err(parse_error(format!(
                "expression nested too deeply at {pos} (the limit is {MAX_DEPTH} levels)"
            )));
        }
        Ok(depth + 1)
    }

    /// The infix operator at the next token and its binding strength; `None`
    /// as the operator stands for `is [not] null`.
    fn infix_operator(&self) -> Option<(Option<BinOp>, u8)> {
        let (op, strength) = match &self.peek().tok {
            Tok::Sym("=") => (BinOp::Eq, COMPARE),
            Tok::Sym("!=" | "<>") => (BinOp::NotEq, COMPARE),
            Tok::Sym("<") => (BinOp::Lt, COMPARE),
            Tok::Sym("<=") => (BinOp::LtEq, COMPARE),
            Tok::Sym(">") => (BinOp::Gt, COMPARE),
            Tok::Sym(">=") => (BinOp::GtEq, COMPARE),
            Tok::Sym("+") => (BinOp::Plus, ADD),
            Tok::Sym("-") => (BinOp::Minus, ADD),
            Tok::Sym("*") => (BinOp::Multiply, MULTIPLY),
            Tok::Sym("/") => (BinOp::Divide, MULTIPLY),
            Tok::Sym("%") => (BinOp::Modulo, MULTIPLY),
            _ if self.keyword("or") => (BinOp::Or, OR),
            _ if self.keyword("and") => (BinOp::And, AND),
            _ if self.keyword("is") => return Some((None, COMPARE)),
            _ => return None,
        };
        Some((Some(op), strength))
    }

    /// An expression whose operators all bind at least `min` strongly
    /// (precedence climbing: one level of recursion per operand, not per
    /// precedence level, keeps the stack small).
    fn operand(&mut self, min: u8) -> Result<Parsed> {
        let mut nots = Vec::new();
        while min <= NOT && self.keyword("not") {
            nots.push(self.advance().pos);
        }
        let mut minuses = Vec::new();
        while self.sym_at(0, "-") {
            minuses.push(self.advance().pos);
        }
        let (mut expr, mut depth) = self.primary()?;
        for pos in minuses.into_iter().rev() {
            expr = match expr {
                Expr::Literal(Value::Int(i)) if i.checked_neg().is_some() => {
                    Expr::Literal(Value::Int(-i))
                }
                Expr::Literal(Value::Float(f)) => Expr::Literal(Value::Float(-f)),
                other => {
                    depth = self.deeper(depth, pos)?;
                    Expr::Neg(Box::new(other))
                }
            };
        }
        if nots.is_empty() {
            return self.infix((expr, depth), min, u8::MAX);
        }
        // `not` governs a comparison: `not a = b` is `not (a = b)`.
        let (mut expr, mut depth) = self.infix((expr, depth), COMPARE, u8::MAX)?;
        for pos in nots.into_iter().rev() {
            depth = self.deeper(depth, pos)?;
            expr = Expr::Not(Box::new(expr));
        }
        self.infix((expr, depth), min, NOT)
    }

    /// Applies the infix operators that follow `left` and bind at least `min`
    /// strongly. `last` is the strength of the operator that built `left`: no
    /// operator binding more strongly may follow it, and comparisons do not
    /// chain (`a = b = c` is an error).
    fn infix(&mut self, mut left: Parsed, min: u8, mut last: u8) -> Result<Parsed> {
        while let Some((op, strength)) = self.infix_operator() {
            if strength < min || strength > last || (strength == COMPARE && last == COMPARE) {
                break;
            }
            let pos = self.advance().pos;
            let depth = self.deeper(left.1, pos)?;
            left = match op {
                None => {
                    let negated = self.eat_keyword("not");
                    self.expect_keyword("null")?;
                    let expr = Box::new(left.0);
                    (Expr::IsNull { expr, negated }, depth)
                }
                Some(op) => {
                    let (right, right_depth) = self.operand(strength + 1)?;
                    let depth = depth.max(self.deeper(right_depth, pos)?);
                    (Expr::binary(op, left.0, right), depth)
                }
            };
            last = strength;
        }
        Ok(left)
    }

    /// Enters a parenthesis or function call.
    fn enter(&mut self, pos: Pos) -> Result<()> {
        if self.nesting >= MAX_NESTING {
            return Err(parse_error(format!(
                "parentheses and calls nested too deeply at {pos} (the limit is {MAX_NESTING})"
            )));
        }
        self.nesting += 1;
        Ok(())
    }

    fn primary(&mut self) -> Result<Parsed> {
        let token = self.peek().clone();
        let literal = |v| Ok((Expr::Literal(v), 1));
        match token.tok {
            Tok::Int(i) => {
                self.advance();
                literal(Value::Int(i))
            }
            Tok::Float(f) => {
                self.advance();
                literal(Value::Float(f))
            }
            Tok::Str(s) => {
                self.advance();
                literal(Value::Text(s))
            }
            Tok::Sym("(") => {
                self.advance();
                self.enter(token.pos)?;
                let inner = self.operand(OR)?;
                self.expect_sym(")")?;
                self.nesting -= 1;
                Ok(inner)
            }
            Tok::Ident(name) if self.sym_at(1, ".") => {
                self.advance();
                self.advance();
                let attr = self.attribute(&name, token.pos)?;
                self.note_var(&name);
                Ok((
                    Expr::Column(ColumnRef {
                        var: Some(name),
                        attr,
                    }),
                    1,
                ))
            }
            Tok::Ident(name) if self.sym_at(1, "(") => self.call(name, token.pos),
            Tok::Ident(name) => {
                self.advance();
                Err(self.expected(&format!(
                    "'.' after \"{name}\" (columns are written var.attr)"
                )))
            }
            _ => Err(self.expected("an expression")),
        }
    }

    /// A function call `name(args)`, at `name`.
    fn call(&mut self, name: String, pos: Pos) -> Result<Parsed> {
        self.advance();
        self.advance();
        self.enter(pos)?;
        let (name, distinct) = match name.as_str() {
            "countu" => ("count".to_string(), true),
            "sumu" => ("sum".to_string(), true),
            "avgu" => ("avg".to_string(), true),
            _ => (name, false),
        };
        let aggregate = matches!(name.as_str(), "count" | "sum" | "avg" | "min" | "max");
        let mut args = Vec::new();
        let mut depth = 0;
        if !self.eat_sym(")") {
            loop {
                let (arg, d) = self.operand(OR)?;
                args.push(arg);
                depth = depth.max(d);
                if aggregate && self.keyword("by") {
                    return Err(unsupported(format!(
                        "grouped aggregate {name}(... by ...) at {} is not supported",
                        self.peek().pos
                    )));
                }
                if aggregate && self.keyword("where") {
                    return Err(unsupported(format!(
                        "aggregate with its own qualification {name}(... where ...) at {} is not supported",
                        self.peek().pos
                    )));
                }
                if !self.eat_sym(",") {
                    break;
                }
            }
            self.expect_sym(")")?;
        }
        self.nesting -= 1;
        if aggregate && args.len() != 1 {
            return Err(parse_error(format!(
                "aggregate {name} at {pos} takes one argument, found {}",
                args.len()
            )));
        }
        let depth = self.deeper(depth, pos)?;
        Ok((
            Expr::Function {
                name,
                args,
                distinct,
            },
            depth,
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn one(text: &str) -> Statement {
        let mut statements = parse(text).unwrap();
        assert_eq!(statements.len(), 1, "{text}");
        statements.remove(0)
    }

    fn sql(text: &str) -> String {
        one(text).to_string()
    }

    fn select(text: &str) -> Select {
        match one(text) {
            Statement::Select(s) => s,
            other => panic!("not a retrieve: {other:?}"),
        }
    }

    fn qual(text: &str) -> Expr {
        select(text).qual.unwrap()
    }

    fn parse_message(text: &str) -> String {
        match parse(text) {
            Err(Error::Parse(m)) => m,
            other => panic!("expected a parse error for {text:?}, got {other:?}"),
        }
    }

    fn unsupported_message(text: &str) -> String {
        match parse(text) {
            Err(Error::Unsupported(m)) => m,
            other => panic!("expected unsupported for {text:?}, got {other:?}"),
        }
    }

    fn int(i: i64) -> Expr {
        Expr::lit(Value::Int(i))
    }

    #[test]
    fn thesis_chapter4_local_query_on_patient() {
        let s = select("retrieve patient.all\n  where patient.name = \"Jones\"");
        assert_eq!(s.targets, vec![Target::All(Some("patient".into()))]);
        assert_eq!(s.ranges, vec![Range::new("patient", "patient")]);
        assert_eq!(
            s.qual,
            Some(Expr::binary(
                BinOp::Eq,
                Expr::col("patient", "name"),
                Expr::lit(Value::text("Jones"))
            ))
        );
        assert_eq!(
            Statement::Select(s).to_string(),
            "SELECT patient.* FROM patient WHERE patient.name = 'Jones'"
        );
    }

    #[test]
    fn thesis_chapter4_mapped_query_with_hyphenated_relations() {
        let text = "retrieve pat-addr.pno, pat-addr.name, pat-addr.addr,\n         pat-other.dob\n\
                    where pat-addr.name = \"Jones\"\nand pat-addr.pno = pat-other.pno";
        assert_eq!(
            sql(text),
            "SELECT pat_addr.pno, pat_addr.name, pat_addr.addr, pat_other.dob \
             FROM pat_addr, pat_other \
             WHERE pat_addr.name = 'Jones' AND pat_addr.pno = pat_other.pno"
        );
        let s = select(text);
        assert_eq!(
            s.ranges,
            vec![
                Range::new("pat_addr", "pat_addr"),
                Range::new("pat_other", "pat_other")
            ]
        );
        assert_eq!(s.qual.unwrap().conjuncts().len(), 2);
    }

    #[test]
    fn thesis_chapter4_tuple_identifier_join() {
        let text = "retrieve pat-phone.name , pat-phone.phone , pat-sex.sex\n\
                    where    pat-phone.name = \"Jones\"\n\
                    and      pat-phone.tuple-id = pat-sex.main-tuple-id";
        assert_eq!(
            sql(text),
            "SELECT pat_phone.name, pat_phone.phone, pat_sex.sex FROM pat_phone, pat_sex \
             WHERE pat_phone.name = 'Jones' AND pat_phone.tuple_id = pat_sex.main_tuple_id"
        );
    }

    #[test]
    fn thesis_chapter2_constant_on_the_left() {
        assert_eq!(
            sql("retrieve (patient.name)\nwhere \"Feltham\" = patient.doctor-name"),
            "SELECT patient.name FROM patient WHERE 'Feltham' = patient.doctor_name"
        );
    }

    #[test]
    fn thesis_chapter5_single_relation_query() {
        let s = select(
            "retrieve patient.pno,patient.name,patient.age\nwhere    patient.name = \"MacIntosh\"",
        );
        assert_eq!(s.targets.len(), 3);
        assert_eq!(
            s.targets[2],
            Target::Expr {
                expr: Expr::col("patient", "age"),
                alias: None
            }
        );
        assert_eq!(
            Statement::Select(s).to_string(),
            "SELECT patient.pno, patient.name, patient.age FROM patient WHERE patient.name = 'MacIntosh'"
        );
    }

    #[test]
    fn thesis_chapter5_join_queries_1_to_3() {
        let q1 = "retrieve (visit.all)\n    where patient.name = \"Smith\"\n        and patient.pno = visit.pno\n        and visit.date  = \"12/12/87\"";
        let q2 = "retrieve (visit.all)\n    where patient.name = \"Smith\"\n        and patient.pno = visit.pno";
        let q3 = "retrieve (visit.all)\n    where patient.pno  = visit.pno";
        assert_eq!(
            sql(q1),
            "SELECT visit.* FROM visit, patient WHERE patient.name = 'Smith' \
             AND patient.pno = visit.pno AND visit.date = '12/12/87'"
        );
        assert_eq!(
            sql(q2),
            "SELECT visit.* FROM visit, patient WHERE patient.name = 'Smith' AND patient.pno = visit.pno"
        );
        assert_eq!(
            sql(q3),
            "SELECT visit.* FROM visit, patient WHERE patient.pno = visit.pno"
        );
        for (q, conjuncts) in [(q1, 3), (q2, 2), (q3, 1)] {
            let s = select(q);
            assert_eq!(
                s.ranges,
                vec![
                    Range::new("visit", "visit"),
                    Range::new("patient", "patient")
                ]
            );
            assert_eq!(s.qual.unwrap().conjuncts().len(), conjuncts);
        }
    }

    #[test]
    fn thesis_chapter4_snapshot_definitions() {
        let by_jones = "define snapshot by-jones ( name, date ) as\n    retrieve patient.name , visit.date\n    \
                        where visit.pno      = patient.pno\n    and visit.code       = doctor.code\n    \
                        and doctor.name      = \"Jones\"";
        let Statement::DefineSnapshot {
            name,
            columns,
            query,
        } = one(by_jones)
        else {
            panic!("not a snapshot");
        };
        assert_eq!(name, "by_jones");
        assert_eq!(columns, vec!["name", "date"]);
        assert_eq!(
            query.to_string(),
            "SELECT patient.name, visit.date FROM patient, visit, doctor WHERE visit.pno = patient.pno \
             AND visit.code = doctor.code AND doctor.name = 'Jones'"
        );
        let seen_jones = "define snapshot seen-jones ( doctor, total-patients ) as\n    \
                          retrieve (visit.gp, total = (count(visit.pno)))\n    \
                          where visit.gp = \"Jones\"\n    and visit.date = \"12/5/63\"";
        let statement = one(seen_jones);
        assert_eq!(
            statement.to_string(),
            "SELECT visit.gp, count(visit.pno) AS total FROM visit \
             WHERE visit.gp = 'Jones' AND visit.date = '12/5/63'"
        );
        let Statement::DefineSnapshot {
            name,
            columns,
            query,
        } = statement
        else {
            panic!("not a snapshot");
        };
        assert_eq!(
            (name.as_str(), columns),
            (
                "seen_jones",
                vec!["doctor".to_string(), "total_patients".to_string()]
            )
        );
        assert!(query.targets.iter().any(|t| matches!(t, Target::Expr { expr, alias: Some(a) } if a == "total" && expr.has_aggregate())));
        let Statement::DefineSnapshot { columns, .. } =
            one("define snapshot s as retrieve (p.all)")
        else {
            panic!("not a snapshot");
        };
        assert!(columns.is_empty());
    }

    #[test]
    fn range_declarations_persist_across_calls() {
        let mut session = QuelSession::new();
        assert_eq!(session.parse("range of p is patient").unwrap(), vec![]);
        let got = session
            .parse("retrieve (p.name) where p.age >= 50")
            .unwrap();
        assert_eq!(
            got[0].to_string(),
            "SELECT p.name FROM patient AS p WHERE p.age >= 50"
        );
        let Statement::Select(s) = &got[0] else {
            panic!()
        };
        assert_eq!(s.ranges, vec![Range::new("p", "patient")]);
        // Redeclaring replaces.
        session.parse("range of p is visit").unwrap();
        assert_eq!(
            session.parse("retrieve (p.all)").unwrap()[0].to_string(),
            "SELECT p.* FROM visit AS p"
        );
        // A text with an error changes nothing, not even its earlier declarations.
        assert!(session.parse("range of p is doctor retrieve (").is_err());
        assert_eq!(
            session.parse("retrieve (p.all)").unwrap()[0].to_string(),
            "SELECT p.* FROM visit AS p"
        );
        // A fresh parse knows no declarations: p is its own relation.
        assert_eq!(sql("retrieve (p.all)"), "SELECT p.* FROM p");
    }

    #[test]
    fn ranges_are_every_variable_in_order_of_first_appearance() {
        let s = select(
            "range of v is visit range of d is doctor \
             retrieve (v.all, p.name) where d.code = v.code and p.pno = v.pno sort by s.x",
        );
        assert_eq!(
            s.ranges,
            vec![
                Range::new("v", "visit"),
                Range::new("p", "p"),
                Range::new("d", "doctor"),
                Range::new("s", "s")
            ]
        );
    }

    #[test]
    fn unique_and_sort_by() {
        let s = select(
            "range of p is patient\nretrieve unique (p.name, years = p.age) sort by years:d, p.name:a, p.pno, p.age:DESC",
        );
        assert!(s.distinct);
        assert_eq!(
            s.targets[1],
            Target::Expr {
                expr: Expr::col("p", "age"),
                alias: Some("years".into())
            }
        );
        assert_eq!(
            s.order_by[0],
            OrderItem {
                expr: Expr::Column(ColumnRef {
                    var: None,
                    attr: "years".into()
                }),
                desc: true
            }
        );
        assert_eq!(
            s.order_by.iter().map(|o| o.desc).collect::<Vec<_>>(),
            vec![true, false, false, true]
        );
        assert_eq!(
            Statement::Select(s).to_string(),
            "SELECT DISTINCT p.name, p.age AS years FROM patient AS p ORDER BY years DESC, p.name, p.pno, p.age DESC"
        );
    }

    #[test]
    fn keywords_are_case_insensitive_and_names_lower_case() {
        assert_eq!(
            sql(
                "RETRIEVE UNIQUE (Patient.Name) WHERE Patient.AGE >= 50 AND NOT Patient.Name IS NULL SORT BY Patient.Name:D"
            ),
            "SELECT DISTINCT patient.name FROM patient WHERE patient.age >= 50 AND NOT patient.name IS NULL \
             ORDER BY patient.name DESC"
        );
    }

    #[test]
    fn a_name_followed_by_a_dot_is_always_a_variable() {
        let s = select("range of unique is patient retrieve unique (unique.name) where not.x = 1");
        assert!(s.distinct);
        assert_eq!(
            s.ranges,
            vec![Range::new("unique", "patient"), Range::new("not", "not")]
        );
        assert_eq!(
            s.qual,
            Some(Expr::binary(BinOp::Eq, Expr::col("not", "x"), int(1)))
        );
    }

    #[test]
    fn append_becomes_insert() {
        let statement = one("append to visit (pno = 7, date = \"12/12/87\", code = -3)");
        assert_eq!(
            statement.to_string(),
            "INSERT INTO visit (pno, date, code) VALUES (7, '12/12/87', -3)"
        );
        let Statement::Insert(insert) = statement else {
            panic!()
        };
        assert_eq!(insert.relation, "visit");
        assert_eq!(insert.columns, vec!["pno", "date", "code"]);
        assert_eq!(
            insert.rows,
            vec![vec![int(7), Expr::lit(Value::text("12/12/87")), int(-3)]]
        );
        assert_eq!(
            sql("append pat-addr (pno = 1 + 2)"),
            "INSERT INTO pat_addr (pno) VALUES (1 + 2)"
        );
    }

    #[test]
    fn append_from_other_relations_is_unsupported() {
        assert_eq!(
            unsupported_message("append to visit (pno = patient.pno)"),
            "quel: append to visit from other relations is not supported (the value of pno uses patient.pno)"
        );
        assert_eq!(
            unsupported_message("append to visit (pno = 1) where patient.pno = 1"),
            "quel: append to visit from other relations is not supported (where clause at line 1 column 27)"
        );
    }

    #[test]
    fn replace_becomes_update() {
        let statement = one(
            "range of p is patient\nreplace p (age = p.age + 1, name = \"Smith\")\n\
             where p.pno = visit.pno and visit.date = \"12/12/87\" and p.age < 99",
        );
        assert_eq!(
            statement.to_string(),
            "UPDATE patient AS p SET age = p.age + 1, name = 'Smith' FROM visit \
             WHERE p.pno = visit.pno AND visit.date = '12/12/87' AND p.age < 99"
        );
        let Statement::Update(update) = statement else {
            panic!()
        };
        assert_eq!(update.target, Range::new("p", "patient"));
        assert_eq!(update.others, vec![Range::new("visit", "visit")]);
        assert_eq!(
            update.assignments[0],
            (
                "age".to_string(),
                Expr::binary(BinOp::Plus, Expr::col("p", "age"), int(1))
            )
        );
        assert_eq!(
            sql("replace patient (age = 3)"),
            "UPDATE patient SET age = 3"
        );
    }

    #[test]
    fn delete_becomes_delete() {
        let statement = one("delete patient where patient.age > 100");
        assert_eq!(
            statement.to_string(),
            "DELETE FROM patient WHERE patient.age > 100"
        );
        let Statement::Delete(delete) = statement else {
            panic!()
        };
        assert_eq!(delete.target, Range::new("patient", "patient"));
        assert!(delete.others.is_empty());
        let statement = one(
            "range of v is visit delete v where v.pno = patient.pno and patient.name = \"Jones\"",
        );
        assert_eq!(
            statement.to_string(),
            "DELETE FROM visit AS v WHERE EXISTS (SELECT 1 FROM patient \
             WHERE v.pno = patient.pno AND patient.name = 'Jones')"
        );
        let Statement::Delete(delete) = statement else {
            panic!()
        };
        assert_eq!(delete.others, vec![Range::new("patient", "patient")]);
        assert_eq!(sql("delete v"), "DELETE FROM v");
    }

    #[test]
    fn several_statements_with_and_without_semicolons() {
        let got = parse(
            "/* session */ range of p is patient retrieve (p.name);\n\
             delete p where p.pno = 1;; append to patient (pno = 2) /* done */ ;",
        )
        .unwrap();
        let printed: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            printed,
            vec![
                "SELECT p.name FROM patient AS p",
                "DELETE FROM patient AS p WHERE p.pno = 1",
                "INSERT INTO patient (pno) VALUES (2)",
            ]
        );
        assert_eq!(parse(" ; /* nothing */ ").unwrap(), vec![]);
    }

    #[test]
    fn hyphen_joins_names_only_between_a_name_and_a_letter() {
        assert_eq!(
            sql(
                "retrieve (a = v.date-1, b = v.pat-addr, c = v.x - v.y, d = v.x -v.y, e = v.x- v.y, f = v.x-2.5, g = v.a-b)"
            ),
            "SELECT v.date - 1 AS a, v.pat_addr AS b, v.x - v.y AS c, v.x - v.y AS d, v.x - v.y AS e, \
             v.x - 2.5 AS f, v.a_b AS g FROM v"
        );
        // `v.x-v.y` is the name `x_v` followed by `.y`: the rule has no exceptions.
        assert_eq!(
            parse_message("retrieve (v.x-v.y)"),
            "quel: expected ')' at line 1 column 16, found \".\""
        );
    }

    #[test]
    fn precedence_or_and_not_comparison_arithmetic() {
        let (a, b, c) = (
            Expr::binary(BinOp::Eq, Expr::col("v", "a"), int(1)),
            Expr::binary(BinOp::Eq, Expr::col("v", "b"), int(2)),
            Expr::binary(BinOp::Eq, Expr::col("v", "c"), int(3)),
        );
        assert_eq!(
            qual("retrieve (v.a) where v.a = 1 or v.b = 2 and v.c = 3"),
            Expr::binary(
                BinOp::Or,
                a.clone(),
                Expr::binary(BinOp::And, b.clone(), c.clone())
            )
        );
        assert_eq!(
            qual("retrieve (v.a) where (v.a = 1 or v.b = 2) and v.c = 3").to_string(),
            "(v.a = 1 OR v.b = 2) AND v.c = 3"
        );
        assert_eq!(
            qual("retrieve (v.a) where not v.a = 1 and v.b = 2"),
            Expr::binary(BinOp::And, Expr::Not(Box::new(a)), b)
        );
        let x = select("retrieve (x = v.a + v.b * 2 - -v.c % 3)")
            .targets
            .remove(0);
        let Target::Expr { expr, .. } = x else {
            panic!()
        };
        assert_eq!(
            expr,
            Expr::binary(
                BinOp::Minus,
                Expr::binary(
                    BinOp::Plus,
                    Expr::col("v", "a"),
                    Expr::binary(BinOp::Multiply, Expr::col("v", "b"), int(2))
                ),
                Expr::binary(
                    BinOp::Modulo,
                    Expr::Neg(Box::new(Expr::col("v", "c"))),
                    int(3)
                ),
            )
        );
        assert_eq!(
            sql("retrieve (x = (v.a + v.b) * 2, y = v.a - (v.b - v.c), z = v.a / 2 >= 1)"),
            "SELECT (v.a + v.b) * 2 AS x, v.a - (v.b - v.c) AS y, v.a / 2 >= 1 AS z FROM v"
        );
    }

    #[test]
    fn minus_before_a_number_is_part_of_the_constant() {
        assert_eq!(
            qual("retrieve (v.a) where v.age > -5 and v.x = -2.5 and v.y = - -1"),
            Expr::conjunction([
                Expr::binary(BinOp::Gt, Expr::col("v", "age"), int(-5)),
                Expr::binary(
                    BinOp::Eq,
                    Expr::col("v", "x"),
                    Expr::lit(Value::Float(-2.5))
                ),
                Expr::binary(BinOp::Eq, Expr::col("v", "y"), int(1)),
            ])
            .unwrap()
        );
        assert_eq!(
            qual("retrieve (v.a) where -v.age < 0"),
            Expr::binary(
                BinOp::Lt,
                Expr::Neg(Box::new(Expr::col("v", "age"))),
                int(0)
            )
        );
    }

    #[test]
    fn is_null_and_is_not_null() {
        let q = qual("retrieve (v.a) where v.a is null and v.b is not null or not v.c is null");
        assert_eq!(
            q.to_string(),
            "v.a IS NULL AND v.b IS NOT NULL OR NOT v.c IS NULL"
        );
        assert_eq!(
            q.conjuncts()[0],
            &Expr::binary(
                BinOp::Or,
                Expr::binary(
                    BinOp::And,
                    Expr::IsNull {
                        expr: Box::new(Expr::col("v", "a")),
                        negated: false
                    },
                    Expr::IsNull {
                        expr: Box::new(Expr::col("v", "b")),
                        negated: true
                    },
                ),
                Expr::Not(Box::new(Expr::IsNull {
                    expr: Box::new(Expr::col("v", "c")),
                    negated: false
                })),
            )
        );
    }

    #[test]
    fn functions_and_aggregates() {
        assert_eq!(
            sql(
                "retrieve (n = count(v.x), m = countu(v.y), s = sumu(v.z), l = lower(v.name), t = now())"
            ),
            "SELECT count(v.x) AS n, count(DISTINCT v.y) AS m, sum(DISTINCT v.z) AS s, \
             lower(v.name) AS l, now() AS t FROM v"
        );
        assert_eq!(
            unsupported_message("retrieve (n = count(v.x by v.y))"),
            "quel: grouped aggregate count(... by ...) at line 1 column 25 is not supported"
        );
        assert_eq!(
            unsupported_message("retrieve (n = avg(v.x where v.y = 1))"),
            "quel: aggregate with its own qualification avg(... where ...) at line 1 column 23 is not supported"
        );
        assert_eq!(
            parse_message("retrieve (n = count())"),
            "quel: aggregate count at line 1 column 15 takes one argument, found 0"
        );
        assert_eq!(
            parse_message("retrieve (n = max(v.a, v.b))"),
            "quel: aggregate max at line 1 column 15 takes one argument, found 2"
        );
    }

    #[test]
    fn string_constants() {
        assert_eq!(
            qual(r#"retrieve (v.a) where v.a = "say \"hi\" \\ now""#),
            Expr::binary(
                BinOp::Eq,
                Expr::col("v", "a"),
                Expr::lit(Value::text(r#"say "hi" \ now"#))
            )
        );
        assert_eq!(
            sql(r"retrieve (v.a) where v.a = 'O''Brien' or v.a = 'it\'s'"),
            "SELECT v.a FROM v WHERE v.a = 'O''Brien' OR v.a = 'it''s'"
        );
        assert_eq!(
            sql("retrieve (v.a) where v.a = \"/* not a comment */\""),
            "SELECT v.a FROM v WHERE v.a = '/* not a comment */'"
        );
    }

    #[test]
    fn numbers() {
        let values: Vec<Expr> =
            select("retrieve (a = 9223372036854775807, b = 9223372036854775808, c = 1.5e3, d = 7)")
                .targets
                .into_iter()
                .map(|t| match t {
                    Target::Expr { expr, .. } => expr,
                    other => panic!("{other:?}"),
                })
                .collect();
        assert!(matches!(values[0], Expr::Literal(Value::Int(i64::MAX))));
        // Too big for i64: kept as a float, as SQLite does.
        assert!(
            matches!(values[1], Expr::Literal(Value::Float(f)) if f == 9_223_372_036_854_775_808.0)
        );
        assert!(matches!(values[2], Expr::Literal(Value::Float(f)) if f == 1500.0));
        assert!(matches!(values[3], Expr::Literal(Value::Int(7))));
        assert_eq!(
            parse_message("retrieve (v.a) where v.a = 1e999"),
            "quel: number 1e999 is too large at line 1 column 28"
        );
    }

    #[test]
    fn syntax_errors_name_what_was_expected_found_and_where() {
        assert_eq!(
            parse_message("retrieve (patient.name\n   where patient.age = 1"),
            "quel: expected ')' at line 2 column 4, found \"where\""
        );
        assert_eq!(
            parse_message("retrieve (p.name) where p.name = \"Jones"),
            "quel: unterminated string starting at line 1 column 34"
        );
        assert_eq!(
            parse_message("retrieve (p.name) where p.name = 'Jones\\'"),
            "quel: unterminated string starting at line 1 column 34"
        );
        assert_eq!(
            parse_message("retrieve (p.name) /* where"),
            "quel: unterminated comment starting at line 1 column 19"
        );
        assert_eq!(
            parse_message("retrieve (p.name) # x"),
            "quel: unexpected character '#' at line 1 column 19"
        );
        assert_eq!(
            parse_message("retreive (patient.name)"),
            "quel: unknown statement \"retreive\" at line 1 column 1"
        );
        assert_eq!(
            parse_message("retrieve (p.a);\n(p.b)"),
            "quel: expected a statement (range, retrieve, append, replace, delete or define) \
             at line 2 column 1, found \"(\""
        );
        assert_eq!(
            parse_message("range of p patient"),
            "quel: expected \"is\" at line 1 column 12, found \"patient\""
        );
        assert_eq!(
            parse_message("range of p is"),
            "quel: expected a relation name at line 1 column 14, found end of input"
        );
        assert_eq!(
            parse_message("retrieve (p.name) where p.age = 1 2"),
            "quel: expected the end of the statement at line 1 column 35, found \"2\""
        );
        assert_eq!(
            parse_message("retrieve (p.name) where name = \"x\""),
            "quel: expected '.' after \"name\" (columns are written var.attr) at line 1 column 30, found \"=\""
        );
        assert_eq!(
            parse_message("retrieve (p.name) where p.age ="),
            "quel: expected an expression at line 1 column 32, found end of input"
        );
        assert_eq!(
            parse_message("retrieve (p.name) where p.age is 3"),
            "quel: expected \"null\" at line 1 column 34, found \"3\""
        );
        assert_eq!(
            parse_message("retrieve (p.name) sort by p.name:z"),
            "quel: expected a sort direction (a, asc, d or desc) at line 1 column 34, found \"z\""
        );
        assert_eq!(
            parse_message("delete from patient"),
            "quel: expected a range variable (\"delete from\" is sql) at line 1 column 8, found \"from\""
        );
        assert_eq!(
            parse_message("replace p (age = 1, AGE = 2)"),
            "quel: attribute \"age\" is assigned twice at line 1 column 21"
        );
        assert_eq!(
            parse_message("define snapshot s (a, b, c) as retrieve (p.a, p.b)"),
            "quel: snapshot s at line 1 column 17 names 3 attributes but its target list has 2"
        );
    }

    #[test]
    fn empty_target_lists_are_refused() {
        assert_eq!(
            parse_message("retrieve ()"),
            "quel: empty target list at line 1 column 11, found \")\""
        );
        assert_eq!(
            parse_message("retrieve where p.x = 1"),
            "quel: empty target list at line 1 column 10, found \"where\""
        );
        assert_eq!(
            parse_message("retrieve"),
            "quel: empty target list at line 1 column 9, found end of input"
        );
        assert_eq!(
            parse_message("retrieve unique ; retrieve (p.a)"),
            "quel: empty target list at line 1 column 17, found \";\""
        );
    }

    #[test]
    fn all_is_only_a_whole_target() {
        assert_eq!(
            parse_message("retrieve (p.name) where p.all = 1"),
            "quel: \"p.all\" at line 1 column 25 is only allowed in a target list"
        );
        assert_eq!(
            parse_message("retrieve (p.name) sort by p.all"),
            "quel: \"p.all\" at line 1 column 27 is only allowed in a target list"
        );
        assert_eq!(
            parse_message("retrieve (p.all + 1)"),
            "quel: expected ')' at line 1 column 17, found \"+\""
        );
        assert_eq!(
            parse_message("retrieve (n = count(p.all))"),
            "quel: \"p.all\" at line 1 column 21 is only allowed in a target list"
        );
    }

    #[test]
    fn unsupported_statements() {
        assert_eq!(
            unsupported_message("retrieve into temp (p.name)"),
            "quel: retrieve into at line 1 column 10 is not supported; define snapshot keeps a result"
        );
        assert_eq!(
            unsupported_message("define view v (p.name)"),
            "quel: define view at line 1 column 8 is not supported; only define snapshot is"
        );
    }

    #[test]
    fn nesting_is_bounded_without_overflowing_the_stack() {
        let deep = format!("retrieve (x = {}1{})", "(".repeat(65), ")".repeat(65));
        assert_eq!(
            parse_message(&deep),
            "quel: parentheses and calls nested too deeply at line 1 column 79 (the limit is 64)"
        );
        let fine = format!("retrieve (x = {}1{})", "(".repeat(64), ")".repeat(64));
        assert_eq!(sql(&fine), "SELECT 1 AS x");
        let calls = format!("retrieve (x = {}v.a{})", "f(".repeat(65), ")".repeat(65));
        assert!(parse_message(&calls).contains("nested too deeply"));
        let long = format!("retrieve (x = v.a{})", " + v.a".repeat(256));
        assert_eq!(
            parse_message(&long),
            "quel: expression nested too deeply at line 1 column 1549 (the limit is 256 levels)"
        );
        let chain = format!("retrieve (x = v.a{})", " + v.a".repeat(255));
        assert!(sql(&chain).ends_with(" + v.a AS x FROM v"));
        for huge in [
            format!("retrieve (x = {}1)", "(".repeat(100_000)),
            format!("retrieve (x = {}v.a)", "-".repeat(100_000)),
            format!("retrieve (v.a) where {}v.a = 1", "not ".repeat(100_000)),
            format!("retrieve (x = v.a{})", " * v.a".repeat(100_000)),
            format!(
                "retrieve (v.a) where v.a = 1{}",
                " and v.a = 1".repeat(100_000)
            ),
        ] {
            assert!(parse_message(&huge).contains("nested too deeply"));
        }
        assert!(parse(&format!("retrieve (x = f({}1))", "v.a, ".repeat(10_000))).is_ok());
    }

    #[test]
    fn recognises_quel_text() {
        for text in [
            "retrieve patient.all where patient.name = \"Jones\"",
            "  /* c */\n RANGE of p is patient",
            "append to visit (pno = 1)",
            "Replace p (age = 1)",
            "delete p where p.pno = 1",
            "delete patient",
            "define snapshot s as retrieve (p.all)",
            "retrieve(p.all)",
        ] {
            assert!(looks_like_quel(text), "{text}");
        }
        for text in [
            "SELECT * FROM patient",
            "DELETE FROM patient",
            "delete /* x */ from patient",
            "REPLACE INTO patient VALUES (1)",
            "delete",
            "delete;",
            "retrieved",
            "/* retrieve",
            "",
            "insert into patient values (1)",
        ] {
            assert!(!looks_like_quel(text), "{text}");
        }
    }

    /// Any outcome but a panic is fine; errors are the crate's, prefixed `quel: `,
    /// and whatever parses prints.
    fn check_never_panics(text: &str) {
        match parse(text) {
            Ok(statements) => statements.iter().for_each(|s| drop(s.to_string())),
            Err(Error::Parse(m) | Error::Unsupported(m)) => assert!(m.starts_with("quel: "), "{m}"),
            Err(other) => panic!("unexpected error kind {other:?}"),
        }
        let _ = looks_like_quel(text);
    }

    const WORDS: &[&str] = &[
        "range",
        "of",
        "is",
        "retrieve",
        "unique",
        "into",
        "append",
        "to",
        "replace",
        "delete",
        "define",
        "snapshot",
        "as",
        "where",
        "sort",
        "by",
        "and",
        "or",
        "not",
        "null",
        "all",
        "count",
        "countu",
        "lower",
        "p",
        "patient",
        "pat-addr",
        "v",
        "(",
        ")",
        ",",
        ".",
        "=",
        "!=",
        "<>",
        "<",
        "<=",
        ">",
        ">=",
        "+",
        "-",
        "*",
        "/",
        "%",
        ":",
        ";",
        ":d",
        "\"Jones\"",
        "'x'",
        "12",
        "1.5",
        "99999999999999999999",
        "1e999",
        "/* c */",
        "\"",
        "'",
        "/*",
        "\\",
        "é",
        "#",
    ];

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            check_never_panics(&s);
        }

        #[test]
        fn never_panics_on_quel_like_tokens(
            words in prop::collection::vec(prop::sample::select(WORDS), 0..40),
            glue in prop::sample::select(vec![" ", "", "\n"]),
        ) {
            check_never_panics(&words.join(glue));
        }

        #[test]
        fn generated_retrievals_parse(x in "[a-z][a-z0-9_]{0,7}", y in "[a-z][a-z0-9_]{0,7}", n in any::<i64>()) {
            let s = select(&format!("retrieve ({x}.a) where {x}.b = {n} and {y}.c != \"s\""));
            let mut expected = vec![Range::new(&x, &x)];
            if y != x {
                expected.push(Range::new(&y, &y));
            }
            prop_assert_eq!(s.ranges, expected);
            let q = s.qual.unwrap();
            let Expr::Binary { right, .. } = q.conjuncts()[0] else { panic!("not a comparison") };
            prop_assert_eq!(right.as_ref(), &int(n));
        }
    }
}
