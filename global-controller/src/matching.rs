//! Graded identity matching: which other sites' records may be the same
//! person as a given one (`snaps_match`).
//!
//! Two records are compared attribute by attribute and each comparison adds
//! an agreement weight (or takes one away), as in Fellegi and Sunter's
//! record linkage: a surname that agrees exactly weighs more than one a
//! slip away, and a birth date that disagrees outright weighs against the
//! match more than a changed surname does, because people marry and move
//! but are born once. The sum grades the pair:
//!
//! | attribute   | agrees | nearly (a slip, a transposition, a dropped name) | disagrees |
//! |-------------|-------:|--------------------------------------------------:|----------:|
//! | surname     |    4   | 3 (Damerau distance 1, Jaro–Winkler ≥ 0.9, same Double Metaphone) | −2; 0 between two women (a married name) |
//! | first names |    3   | 2.5 (same first given name); 2 (first given name a slip away) | −2 |
//! | birth date  |    4   | 2.5 (day and month transposed, a day out, one digit) | −3 |
//! | sex         |  0.5   |  –                                                 | −2 |
//! | address     |    1   | 1 (first line Jaro–Winkler ≥ 0.9)                 | 0 (people move) |
//!
//! A missing value on either side weighs nothing. `certain` from 10.5 (all
//! of names and birth date agree, or one of them nearly), `probable` from 7
//! (a married name, or two near agreements), `possible` from 5.5 (a married
//! name with a slip in the birth date: worth a look, never a link by
//! itself). Namesakes born on other days (4.5) are not listed: a lookup by
//! name shows them.
//!
//! Candidates come from blocking keys the store can look up by equality:
//! the birth date and its near variants, the surname, and the first given
//! name. A record that shares none of them with the person (every one of
//! them changed at once) is not found.

use std::fmt;

use rphonetic::{DoubleMetaphone, Encoder};
use snaps_schema::calendar;

/// The identifying details of one record, as the global snapshot holds them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Person {
    /// Surname.
    pub surname: Option<String>,
    /// Given names, space-separated.
    pub first_names: Option<String>,
    /// Date of birth, `YYYYMMDD`.
    pub dob: Option<i64>,
    /// Sex as recorded (`M`, `F`).
    pub sex: Option<String>,
    /// Address lines, first line first.
    pub address: Vec<Option<String>>,
}

/// How likely two records are the same person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grade {
    /// Worth a look.
    Possible,
    /// Likely: confirm before linking.
    Probable,
    /// As good as the same record.
    Certain,
    /// A user confirmed it is the same person (a link), whatever the score.
    Linked,
}

impl Grade {
    /// The name shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Grade::Linked => "linked",
            Grade::Certain => "certain",
            Grade::Probable => "probable",
            Grade::Possible => "possible",
        }
    }
}

impl fmt::Display for Grade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lowest sums of the grades.
const CERTAIN: f64 = 10.5;
const PROBABLE: f64 = 7.0;
const POSSIBLE: f64 = 5.5;

/// The highest sum two records can reach.
pub const MAX_SCORE: f64 = 12.5;

/// What a comparison found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The sum of the agreement weights.
    pub score: f64,
    /// Its grade; `None` below `possible`.
    pub grade: Option<Grade>,
}

/// Compares two records. The comparison is symmetric.
pub fn compare(a: &Person, b: &Person) -> Verdict {
    let both_women = a.sex.as_deref().map(norm).as_deref() == Some("f")
        && b.sex.as_deref().map(norm).as_deref() == Some("f");
    let mut score = 0.0;
    if let (Some(x), Some(y)) = (&a.surname, &b.surname) {
        score += match closeness(x, y) {
            Closeness::Same => 4.0,
            Closeness::Near => 3.0,
            Closeness::Other if both_women => 0.0,
            Closeness::Other => -2.0,
        };
    }
    if let (Some(x), Some(y)) = (&a.first_names, &b.first_names) {
        score += first_names(x, y);
    }
    if let (Some(x), Some(y)) = (a.dob, b.dob) {
        score += if x == y {
            4.0
        } else if near_dates(x, y) {
            2.5
        } else {
            -3.0
        };
    }
    if let (Some(x), Some(y)) = (&a.sex, &b.sex) {
        score += if norm(x) == norm(y) { 0.5 } else { -2.0 };
    }
    let line = |p: &Person| p.address.first().cloned().flatten();
    if let (Some(x), Some(y)) = (line(a), line(b))
        && closeness(&x, &y) != Closeness::Other
    {
        score += 1.0;
    }
    let grade = if score >= CERTAIN {
        Some(Grade::Certain)
    } else if score >= PROBABLE {
        Some(Grade::Probable)
    } else if score >= POSSIBLE {
        Some(Grade::Possible)
    } else {
        None
    };
    Verdict { score, grade }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closeness {
    Same,
    Near,
    Other,
}

/// Lower case, letters and digits only: `O'Brien` and `OBrien` are alike.
fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

fn closeness(x: &str, y: &str) -> Closeness {
    let (x, y) = (norm(x), norm(y));
    if x.is_empty() || y.is_empty() {
        return Closeness::Other;
    }
    if x == y {
        return Closeness::Same;
    }
    let metaphone = DoubleMetaphone::default();
    if strsim::damerau_levenshtein(&x, &y) <= 1
        || strsim::jaro_winkler(&x, &y) >= 0.9
        || metaphone.encode(&x) == metaphone.encode(&y)
    {
        Closeness::Near
    } else {
        Closeness::Other
    }
}

fn first_names(x: &str, y: &str) -> f64 {
    if norm(x) == norm(y) && !norm(x).is_empty() {
        return 3.0;
    }
    let first = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    match closeness(&first(x), &first(y)) {
        Closeness::Same => 2.5,
        Closeness::Near => 2.0,
        Closeness::Other => -2.0,
    }
}

/// Whether two different `YYYYMMDD` dates are one slip apart: day and month
/// transposed, a day out, or one digit different.
fn near_dates(x: i64, y: i64) -> bool {
    near_variants(x).contains(&y)
        || strsim::damerau_levenshtein(&x.to_string(), &y.to_string()) <= 1
}

/// The dates a registration of someone born on `dob` (`YYYYMMDD`) most
/// often shows instead: day and month transposed, a day either side. Valid
/// dates only.
fn near_variants(dob: i64) -> Vec<i64> {
    let (year, month, day) = (dob / 10_000, dob / 100 % 100, dob % 100);
    let mut out = Vec::new();
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return out;
    }
    if day <= 12 && day != month {
        out.push(year * 10_000 + day * 100 + month);
    }
    let n = calendar::day_of(year, month, day);
    for d in [n - 1, n + 1] {
        let (y, m, dd) = calendar::civil(d);
        out.push(y * 10_000 + m * 100 + dd);
    }
    out
}

/// What the store looks candidates up by: the birth date and its near
/// variants, the surname, and the first given name (alone, or followed by
/// more names).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockingKeys {
    /// Birth dates, `YYYYMMDD`.
    pub dobs: Vec<i64>,
    /// The surname as recorded.
    pub surname: Option<String>,
    /// The first given name as recorded.
    pub first_name: Option<String>,
}

/// The blocking keys of `p`.
pub fn blocking_keys(p: &Person) -> BlockingKeys {
    let mut dobs = Vec::new();
    if let Some(d) = p.dob {
        dobs.push(d);
        dobs.extend(near_variants(d));
    }
    BlockingKeys {
        dobs,
        surname: p.surname.clone().filter(|s| !s.trim().is_empty()),
        first_name: p
            .first_names
            .as_deref()
            .and_then(|f| f.split_whitespace().next())
            .map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(line: &str) -> Person {
        // surname | first names | dob | sex | address line 1
        let f: Vec<Option<String>> = line
            .split('|')
            .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
            .collect();
        Person {
            surname: f[0].clone(),
            first_names: f[1].clone(),
            dob: f[2].as_deref().map(|d| d.parse().unwrap()),
            sex: f[3].clone(),
            address: vec![f[4].clone()],
        }
    }

    /// Pairs a registrar would recognise, and the grade each must get.
    #[test]
    fn pairs_are_graded_as_a_registrar_would() {
        let cases = [
            // the same record
            (
                "Harris | Lynette | 19441118 | F | 284 Ilam Rd",
                "Harris | Lynette | 19441118 | F | 284 Ilam Rd",
                Some(Grade::Certain),
            ),
            // moved house
            (
                "Harris | Lynette | 19441118 | F | 284 Ilam Rd",
                "Harris | Lynette | 19441118 | F | 3 Innes Rd",
                Some(Grade::Certain),
            ),
            // a slip in the surname, letters swapped
            (
                "Thompson | Julie | 19371108 | F | 66 Papanui Rd",
                "Thopmson | Julie | 19371108 | F | 9 Ferry Rd",
                Some(Grade::Certain),
            ),
            // a letter left out, apostrophe dropped
            (
                "O'Brien | Jennifer Alison | 19660122 | F | ",
                "OBrien | Jennifer Alison | 19660122 | F | ",
                Some(Grade::Certain),
            ),
            // a second given name dropped
            (
                "King | Mark Michael | 19351021 | M | ",
                "King | Mark | 19351021 | M | ",
                Some(Grade::Certain),
            ),
            // day and month transposed
            (
                "Wilson | Robert | 19250103 | M | 151 Brougham St",
                "Wilson | Robert | 19250301 | M | 2 Pages Rd",
                Some(Grade::Probable),
            ),
            // a birth date a day out, same address
            (
                "Wilson | Robert | 19250103 | M | 151 Brougham St",
                "Wilson | Robert | 19250104 | M | 151 Brougham St",
                Some(Grade::Certain),
            ),
            // a married name
            (
                "Smith | Susan Rachel | 19351223 | F | 5 Colombo St",
                "Walker | Susan Rachel | 19351223 | F | 8 Opawa Rd",
                Some(Grade::Probable),
            ),
            // a married name and a dropped given name
            (
                "Smith | Susan Rachel | 19351223 | F | ",
                "Walker | Susan | 19351223 | F | ",
                Some(Grade::Probable),
            ),
            // namesakes born on other days: a lookup by name shows them
            (
                "Smith | John | 19500101 | M | ",
                "Smith | John | 19720815 | M | ",
                None,
            ),
            // a married name and a birth date a day out: worth a look
            (
                "Smith | Susan | 19351223 | F | ",
                "Walker | Susan | 19351224 | F | ",
                Some(Grade::Possible),
            ),
            // a man's surname seldom changes: at most worth a look
            (
                "Smith | John | 19500101 | M | ",
                "Jones | John | 19500101 | M | ",
                Some(Grade::Possible),
            ),
            // two men with only a surname and a birth year in common
            (
                "Smith | John | 19500101 | M | ",
                "Smith | Peter | 19501231 | M | ",
                None,
            ),
            // nothing in common but the birth date
            (
                "Smith | John | 19500101 | M | ",
                "Patel | Ling | 19500101 | F | ",
                None,
            ),
            // same names and date, different sex
            (
                "Lee | Jun | 19800202 | M | ",
                "Lee | Jun | 19800202 | F | ",
                Some(Grade::Probable),
            ),
            // no sex recorded at one site: weighs nothing
            (
                "Ngata | Hemi | 19610704 | M | ",
                "Ngata | Hemi | 19610704 |  | ",
                Some(Grade::Certain),
            ),
        ];
        for (a, b, grade) in cases {
            let (pa, pb) = (person(a), person(b));
            let v = compare(&pa, &pb);
            assert_eq!(v.grade, grade, "{a} ~ {b}: score {}", v.score);
            assert_eq!(compare(&pb, &pa), v, "symmetric: {a} ~ {b}");
            assert!(v.score <= MAX_SCORE);
        }
    }

    #[test]
    fn blocking_keys_reach_the_near_dates() {
        let keys = blocking_keys(&person("King | Mark Michael | 19351031 | M | "));
        assert_eq!(keys.dobs, [19351031, 19351030, 19351101]);
        assert_eq!(keys.first_name.as_deref(), Some("Mark"));
        let keys = blocking_keys(&person("King | Mark | 19350401 | M | "));
        assert_eq!(keys.dobs, [19350401, 19350104, 19350331, 19350402]);
    }

    #[test]
    fn impossible_dates_have_no_variants() {
        assert!(near_variants(19351341).is_empty());
        assert!(!near_dates(19351341, 20001231));
    }
}
