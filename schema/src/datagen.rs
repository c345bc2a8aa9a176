//! A seeded generator of radiology data: doctors, patients, visits, visit
//! reports, outgoing requests and the reference relations of every site of a
//! network that uses the thesis' local schema (appendix H,
//! `fixtures/radiology/local.sql`).
//!
//! The generator first builds a model of the network — people, and for each
//! site its doctors, patient records, visits and reports — and then writes each
//! model object out as a row of every local relation the site's catalog
//! declares, finding attributes by name. So a site whose schema orders the
//! attributes differently still gets correct rows, and every value is checked
//! with [`ValueType::check`](crate::ValueType::check) against the attribute it
//! lands in: the output always fits the schema, or generation fails naming the
//! site and the attribute. An attribute the generator does not know is NULL
//! (an error if it is declared NOT NULL); a relation it does not know gets no
//! rows.
//!
//! Keys follow the network's rules: each site numbers its patients (`pno`) and
//! visits (`vno`) from its own key range and its doctors from
//! `key_ranges.doctor`, so keys are unique network-wide without coordination.
//! Some people are patients at two or three sites: each site has its own record
//! of them, under its own `pno`, and visits at each. The first site to hold a
//! person records them as they are; a later site's registration may vary as
//! real registrations do (a typing slip in a name, a dropped second given
//! name, day and month transposed, a married name, a new address), drawn
//! from a stream of its own so the rest of the data does not depend on it.
//! [`SiteData::person_of`] keeps the truth: which person each record is.
//!
//! The data is set in the thesis' time: visits fall between 1 January 1984 and
//! 30 June 1988. Dates are `i4` YYYYMMDD, times `i2` HHMM. Randomness comes
//! from a SplitMix64 generator and integer or exactly rounded floating point
//! arithmetic only (no `exp`, `ln` or `sqrt`, whose last bits vary between
//! platforms), so the same configuration, scale and seed give the same data on
//! every machine.

use crate::calendar::day_of;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::{Error, KeyRange, NetworkConfig, Relation, Result, SiteCode, SiteConfig, Value};

/// How much data to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    /// Patient records at each site (shared people included).
    pub patients_per_site: usize,
    /// Mean number of visits per patient record (a person who is a patient at
    /// several sites has at least one visit at each).
    pub visits_per_patient: f64,
    /// Mean number of lines in a visit report.
    pub report_lines: usize,
    /// Doctors (referrers, consultants, radiologists, radiographers) at each
    /// site.
    pub doctors_per_site: usize,
    /// Share of each site's patient records that belong to people who are also
    /// patients at another site (0 to 1). Ignored in a one-site network.
    pub shared_fraction: f64,
}

impl Scale {
    /// A scale with `patients_per_site` patients per site and everyday
    /// proportions: about 2 visits per patient, 4 lines per report, 5 doctors
    /// plus one per 50 patients, and 15% of patients shared with another site.
    pub fn new(patients_per_site: usize) -> Scale {
        Scale {
            patients_per_site,
            visits_per_patient: 2.0,
            report_lines: 4,
            doctors_per_site: 5 + patients_per_site / 50,
            shared_fraction: 0.15,
        }
    }

    fn check(&self) -> Result<()> {
        if !(self.visits_per_patient.is_finite() && self.visits_per_patient >= 0.0) {
            return Err(Error::Value(format!(
                "datagen: visits per patient must be a number of at least 0, not {}",
                self.visits_per_patient
            )));
        }
        if !(0.0..=1.0).contains(&self.shared_fraction) {
            return Err(Error::Value(format!(
                "datagen: the shared fraction must be between 0 and 1, not {}",
                self.shared_fraction
            )));
        }
        Ok(())
    }
}

/// Rows of one site, per local relation name, each row a `Vec<Value>` in the
/// relation's attribute order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteData {
    /// Rows by local relation name; every relation of the site's catalog has
    /// an entry.
    pub rows: BTreeMap<String, Vec<Vec<Value>>>,
    /// The ground truth of identity: the person (a number unique in the
    /// network) each of the site's patient numbers is a record of. Two
    /// sites' records of the same person have the same number.
    pub person_of: BTreeMap<i64, u64>,
}

/// Generates the radiology network's data for every site. Fails with a clear
/// error if a site's key range is too small for the scale, or if a generated
/// value does not fit a site's schema.
pub fn generate(
    config: &NetworkConfig,
    scale: &Scale,
    seed: u64,
) -> Result<BTreeMap<SiteCode, SiteData>> {
    scale.check()?;
    let catalogs = config
        .sites
        .iter()
        .map(|site| config.local_catalog(site))
        .collect::<Result<Vec<_>>>()?;
    // Fail before any work when the known counts do not fit; the number of
    // visits is only known later (SiteModel::new).
    for site in &config.sites {
        need_keys(site, "patient", scale.patients_per_site)?;
        need_keys(site, "doctor", scale.doctors_per_site)?;
    }

    let mut rng = Rng::new(seed);
    let mut people = People::new(config.sites.len(), scale, &mut rng);
    let models = config
        .sites
        .iter()
        .enumerate()
        .map(|(i, site)| {
            let mut site_rng = rng.fork(u64::from(site.number.0));
            SiteModel::new(config, i, &people, scale, &mut site_rng)
        })
        .collect::<Result<Vec<_>>>()?;
    people.settle_deaths(&models, &mut rng);

    let mut out = BTreeMap::new();
    for ((i, site), catalog) in config.sites.iter().enumerate().zip(&catalogs) {
        let mut data = SiteData::default();
        for relation in catalog.relations() {
            let rows = models[i].rows(config, i, relation, &people.persons)?;
            data.rows.insert(relation.name.clone(), rows);
        }
        data.person_of = models[i]
            .patients
            .iter()
            .map(|p| (p.pno, p.person as u64))
            .collect();
        out.insert(site.code.clone(), data);
    }
    Ok(out)
}

/// Checks that a site's key range for `relation` holds `needed` keys.
fn need_keys(site: &SiteConfig, relation: &str, needed: usize) -> Result<KeyRange> {
    let range = site.key_range(relation);
    let fits = i64::try_from(needed).is_ok_and(|n| n <= range.len().max(0));
    if fits {
        Ok(range)
    } else {
        Err(Error::Catalog(format!(
            "site {}: key range {}..={} for {relation} holds {} keys, but the scale needs {needed}",
            site.code,
            range.first,
            range.last,
            range.len().max(0)
        )))
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast and the same on every
/// machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// An independent stream for part `k` of the work, without advancing this
    /// one.
    fn fork(&self, k: u64) -> Rng {
        Rng(mix(self.0 ^ mix(k.wrapping_add(1))))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A number in `0..n`; `n` must not be 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    /// A float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn weighted<'a, T>(&mut self, items: &'a [(T, u32)]) -> &'a T {
        let total: u32 = items.iter().map(|(_, w)| w).sum();
        let mut roll = self.below(u64::from(total)) as u32;
        for (item, weight) in items {
            if roll < *weight {
                return item;
            }
            roll -= weight;
        }
        &items[items.len() - 1].0
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// A count with the given mean: binomial over `3 * ceil(mean)` trials,
    /// close to Poisson without transcendental functions.
    fn count(&mut self, mean: f64) -> usize {
        if mean <= 0.0 {
            return 0;
        }
        let trials = (mean * 3.0).ceil() as usize;
        let p = mean / trials as f64;
        (0..trials).filter(|_| self.chance(p)).count()
    }
}

/// The SplitMix64 output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The YYYYMMDD form of a day number.
fn yyyymmdd(days: i64) -> i64 {
    let (year, month, day) = crate::calendar::civil(days);
    year * 10_000 + month * 100 + day
}

/// The first and last day visits fall on.
fn period() -> (i64, i64) {
    (day_of(1984, 1, 1), day_of(1988, 6, 30))
}

fn yes_no(b: bool) -> Value {
    Value::text(if b { "Y" } else { "N" })
}

fn int_or_null(i: Option<i64>) -> Value {
    i.map_or(Value::Null, Value::Int)
}

/// Names of one ethnic group, with the race code of `patient.race`.
struct Group {
    race: &'static str,
    weight: u32,
    surnames: &'static [&'static str],
    male: &'static [&'static str],
    female: &'static [&'static str],
}

#[rustfmt::skip]
const EUROPEAN_MALE: &[&str] = &[
    "John", "David", "Peter", "Michael", "James", "Robert", "Ian", "Graham", "Bruce", "Neville",
    "Mark", "Andrew", "Stephen", "Craig", "Warren", "Colin", "Murray", "Brian", "Keith", "Alan",
];
#[rustfmt::skip]
const EUROPEAN_FEMALE: &[&str] = &[
    "Mary", "Margaret", "Susan", "Jennifer", "Anne", "Helen", "Karen", "Christine", "Judith",
    "Sarah", "Rachel", "Michelle", "Julie", "Janet", "Barbara", "Joan", "Elizabeth", "Lynette",
    "Robyn", "Alison",
];

#[rustfmt::skip]
const GROUPS: &[Group] = &[
    Group {
        race: "NZE",
        weight: 80,
        surnames: &[
            "Smith", "Jones", "Williams", "Brown", "Wilson", "Taylor", "Anderson", "Thomas",
            "Walker", "White", "Thompson", "Campbell", "Scott", "Stewart", "Robertson", "Clark",
            "Harris", "Young", "King", "Wright", "Mitchell", "Kelly", "Martin", "O'Brien",
            "McDonald", "MacKenzie", "Fraser", "Hamilton", "Reid", "Morrison",
        ],
        male: EUROPEAN_MALE,
        female: EUROPEAN_FEMALE,
    },
    Group {
        race: "MAOR",
        weight: 9,
        surnames: &[
            "Ngata", "Tipene", "Parata", "Te Paa", "Wihongi", "Hohaia", "Kereama", "Ruru",
            "Mahuika", "Tau", "Pohatu", "Tainui", "Ratana", "Solomon",
        ],
        male: &["Hemi", "Wiremu", "Rangi", "Tama", "Hone", "Rawiri", "Tane", "John", "Peter"],
        female: &["Aroha", "Mere", "Ngaire", "Hine", "Kiri", "Anahera", "Mary", "Ana"],
    },
    Group {
        race: "PI",
        weight: 3,
        surnames: &["Tuilagi", "Fa'asavalu", "Leota", "Tupou", "Fifita", "Sopoaga", "Vaipulu"],
        male: &["Sione", "Tevita", "Ioane", "Semisi", "Peni"],
        female: &["Losa", "Mele", "Sina", "Ana", "Salote"],
    },
    Group {
        race: "ASN",
        weight: 4,
        surnames: &["Wong", "Chan", "Lee", "Chin", "Ng", "Patel", "Singh", "Kumar"],
        male: &["Wei", "Jun", "Raj", "Anil", "Kevin", "Henry"],
        female: &["Mei", "Ling", "Priya", "Anjali", "Grace", "Lily"],
    },
    Group {
        race: "OTH",
        weight: 4,
        surnames: &["de Vries", "Jansen", "Schmidt", "Novak", "Rossi", "Kowalski", "Papadopoulos"],
        male: EUROPEAN_MALE,
        female: EUROPEAN_FEMALE,
    },
];

#[rustfmt::skip]
const STREETS: &[&str] = &[
    "Riccarton Rd", "Papanui Rd", "Colombo St", "Manchester St", "Lincoln Rd", "Ferry Rd",
    "Blenheim Rd", "Memorial Ave", "Fendalton Rd", "Harewood Rd", "Innes Rd", "Cashel St",
    "Hereford St", "Gloucester St", "Bealey Ave", "Halswell Rd", "Main North Rd", "Pages Rd",
    "Marshland Rd", "Yaldhurst Rd", "Wairakei Rd", "Ilam Rd", "Opawa Rd", "Brougham St",
];

#[rustfmt::skip]
const SUBURBS: &[&str] = &[
    "Riccarton", "Fendalton", "Merivale", "Papanui", "Sydenham", "Linwood", "Addington",
    "Spreydon", "Cashmere", "St Albans", "Shirley", "Hornby", "Sumner", "Redcliffs", "Halswell",
    "Burnside", "Bryndwr", "Opawa", "Woolston", "New Brighton", "Avonhead", "Ilam",
    "Upper Riccarton", "Aranui",
];

/// Towns outside the city: (town, district).
const TOWNS: &[(&str, &str)] = &[
    ("Rangiora", "North Canterbury"),
    ("Kaiapoi", "North Canterbury"),
    ("Lincoln", "Canterbury"),
    ("Rolleston", "Canterbury"),
    ("Akaroa", "Banks Peninsula"),
    ("Ashburton", "Mid Canterbury"),
];

/// A street address in or around Christchurch: (street, suburb or town, city
/// or district).
fn address(rng: &mut Rng) -> [String; 3] {
    let street = format!("{} {}", rng.between(1, 299), rng.pick(STREETS));
    if rng.chance(0.1) {
        let (town, district) = rng.pick(TOWNS);
        [street, town.to_string(), district.to_string()]
    } else {
        [
            street,
            rng.pick(SUBURBS).to_string(),
            "Christchurch".to_string(),
        ]
    }
}

/// A Christchurch telephone number, `03-3xxxxxx`.
fn phone(rng: &mut Rng) -> String {
    format!("03-3{:06}", rng.below(1_000_000))
}

/// A person, who may be a patient at several sites.
struct Person {
    surname: &'static str,
    first_names: String,
    dob: i64,
    male: bool,
    title: &'static str,
    race: &'static str,
    address: [String; 3],
    contrast_sen: bool,
    vip: bool,
    deceased: bool,
    post_mortem: bool,
    /// Set once every site's visits are known, so death follows the last one.
    dod: Option<i64>,
}

impl Person {
    fn new(rng: &mut Rng) -> Person {
        let weights: Vec<(usize, u32)> = GROUPS.iter().map(|g| g.weight).enumerate().collect();
        let group = &GROUPS[*rng.weighted(&weights)];
        let male = rng.chance(0.5);
        let given = if male { group.male } else { group.female };
        let mut first_names = rng.pick(given).to_string();
        if rng.chance(0.6) {
            let second = rng.pick(given);
            if *second != first_names {
                first_names = format!("{first_names} {second}");
            }
        }
        let (_, end) = period();
        let dob = end - rng.between(0, 95 * 365);
        let child = end - dob < 13 * 365;
        let title = match (male, child) {
            (true, true) => "Mstr",
            (false, true) => "Miss",
            _ if rng.chance(0.02) => "Dr",
            (true, false) => "Mr",
            (false, false) => *rng.weighted(&[("Mrs", 6), ("Miss", 2), ("Ms", 2)]),
        };
        let deceased = rng.chance(0.02);
        let surname = *rng.pick(group.surnames);
        Person {
            surname,
            first_names,
            dob,
            male,
            title,
            race: group.race,
            address: address(rng),
            contrast_sen: rng.chance(0.03),
            vip: rng.chance(0.01),
            deceased,
            post_mortem: deceased && rng.chance(0.3),
            dod: None,
        }
    }
}

/// What one site recorded of a person: as they are, or with the variations
/// a second registration brings.
struct Registration {
    title: &'static str,
    surname: String,
    first_names: String,
    /// `YYYYMMDD`.
    dob: i64,
    address: [String; 3],
}

impl Registration {
    fn of(person: &Person) -> Registration {
        Registration {
            title: person.title,
            surname: person.surname.to_string(),
            first_names: person.first_names.clone(),
            dob: yyyymmdd(person.dob),
            address: person.address.clone(),
        }
    }

    /// Varies a second registration as registrations vary: a slip in the
    /// surname (6%), a married name (12% of adult women), a dropped or
    /// mistyped given name (8%), day and month transposed (3%, where both
    /// are months) or a birth date a day out (3%), a new address (20%).
    fn vary(&mut self, person: &Person, rng: &mut Rng) {
        if rng.chance(0.06) {
            self.surname = typo(&self.surname, rng);
        }
        let adult_woman = !person.male && !matches!(person.title, "Miss" | "Mstr");
        if adult_woman && rng.chance(0.12) {
            let names = GROUPS[0].surnames;
            let married = *rng.pick(names);
            if married != person.surname {
                self.surname = married.to_string();
                self.title = "Mrs";
            }
        }
        if rng.chance(0.08) {
            self.first_names = match self.first_names.split_once(' ') {
                Some((first, _)) if rng.chance(0.5) => first.to_string(),
                _ => typo(&self.first_names, rng),
            };
        }
        let (year, month, day) = (self.dob / 10_000, self.dob / 100 % 100, self.dob % 100);
        if day <= 12 && day != month && rng.chance(0.03) {
            self.dob = year * 10_000 + day * 100 + month;
        } else if rng.chance(0.03) {
            let shift = if rng.chance(0.5) { 1 } else { -1 };
            self.dob = yyyymmdd(person.dob + shift);
        }
        if rng.chance(0.2) {
            self.address = address(rng);
        }
    }
}

/// `name` with one slip of the keyboard: a letter swapped with the next, left
/// out, doubled or replaced. Names of fewer than three letters are kept.
fn typo(name: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    let letters: Vec<usize> = (1..chars.len())
        .filter(|&i| chars[i].is_ascii_lowercase())
        .collect();
    if chars.len() < 3 || letters.is_empty() {
        return name.to_string();
    }
    let i = *rng.pick(&letters);
    match rng.below(4) {
        0 if i + 1 < chars.len() && chars[i + 1].is_ascii_lowercase() => chars.swap(i, i + 1),
        1 => {
            chars.remove(i);
        }
        2 => chars.insert(i, chars[i]),
        _ => {
            let c = (b'a' + rng.below(26) as u8) as char;
            chars[i] = if c == chars[i] { 'e' } else { c };
        }
    }
    chars.into_iter().collect()
}

/// Everyone in the network, and who is a patient where.
struct People {
    persons: Vec<Person>,
    /// For each site (by index in the configuration), the people it has a
    /// patient record for, in record order.
    patients: Vec<Vec<usize>>,
    /// For each person, the sites (by index) that have a record of them.
    sites_of: Vec<Vec<usize>>,
}

impl People {
    fn new(sites: usize, scale: &Scale, rng: &mut Rng) -> People {
        let mut people = People {
            persons: Vec::new(),
            patients: vec![Vec::new(); sites],
            sites_of: Vec::new(),
        };
        let per_site = scale.patients_per_site;
        let shared = if sites >= 2 {
            ((scale.shared_fraction * per_site as f64).round() as usize).min(per_site)
        } else {
            0
        };
        // Shared people first: each takes a record at two (sometimes three) of
        // the sites with the most shared places left, so the sites fill evenly.
        let mut left = vec![shared; sites];
        loop {
            let mut open: Vec<usize> = (0..sites).filter(|&s| left[s] > 0).collect();
            if open.len() < 2 {
                break;
            }
            rng.shuffle(&mut open);
            open.sort_by_key(|&s| Reverse(left[s]));
            let n = if open.len() >= 3 && rng.chance(0.25) {
                3
            } else {
                2
            };
            let mut at = open[..n].to_vec();
            at.sort_unstable();
            for &s in &at {
                left[s] -= 1;
            }
            people.add(Person::new(rng), at);
        }
        for s in 0..sites {
            while people.patients[s].len() < per_site {
                people.add(Person::new(rng), vec![s]);
            }
            rng.shuffle(&mut people.patients[s]);
        }
        people
    }

    fn add(&mut self, person: Person, sites: Vec<usize>) {
        let id = self.persons.len();
        for &s in &sites {
            self.patients[s].push(id);
        }
        self.persons.push(person);
        self.sites_of.push(sites);
    }

    /// Gives every deceased person a date of death after their last visit at
    /// any site.
    fn settle_deaths(&mut self, models: &[SiteModel], rng: &mut Rng) {
        let mut last_visit: BTreeMap<usize, i64> = BTreeMap::new();
        for model in models {
            for visit in &model.visits {
                let person = model.patients[visit.patient].person;
                let last = last_visit.entry(person).or_insert(visit.day);
                *last = (*last).max(visit.day);
            }
        }
        let (start, end) = period();
        for (id, person) in self.persons.iter_mut().enumerate() {
            if person.deceased {
                let after = last_visit
                    .get(&id)
                    .copied()
                    .unwrap_or(person.dob.max(start));
                person.dod = Some((after + rng.between(1, 90)).min(end));
            }
        }
    }
}

/// What a doctor does; decides who refers, consults, reports and takes films.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Radiologist,
    Radiographer,
    Specialist,
    GeneralPractitioner,
}

struct Doctor {
    code: i64,
    role: Role,
    title: &'static str,
    initials: String,
    /// Staff code (initials and surname initial) used in visit.radgrapher,
    /// rad_report and rad_verify.
    staff: String,
    surname: &'static str,
    address: [String; 3],
    phone: String,
}

impl Doctor {
    fn new(index: usize, code: i64, rng: &mut Rng) -> Doctor {
        // Every site gets a radiologist and a radiographer before anyone else.
        let role = match index % 5 {
            0 => Role::Radiologist,
            1 => Role::Radiographer,
            2 => Role::Specialist,
            _ => Role::GeneralPractitioner,
        };
        let male = rng.chance(0.6);
        let group = &GROUPS[rng.below(GROUPS.len() as u64) as usize];
        let given = if male { group.male } else { group.female };
        let letters: Vec<char> = (0..rng.between(1, 2))
            .filter_map(|_| rng.pick(given).chars().next())
            .collect();
        let surname = *rng.pick(group.surnames);
        let initials: String = letters.iter().map(|c| format!("{c}.")).collect();
        let mut staff: String = letters.iter().collect();
        staff.extend(surname.chars().next().map(|c| c.to_ascii_uppercase()));
        let title = match (role, male) {
            (Role::Radiographer, true) => "Mr",
            (Role::Radiographer, false) => "Ms",
            _ => "Dr",
        };
        Doctor {
            code,
            role,
            title,
            initials,
            staff,
            surname,
            address: address(rng),
            phone: phone(rng),
        }
    }
}

/// A region of the body, which decides the findings in a report.
#[derive(Clone, Copy)]
enum Region {
    Chest,
    Abdomen,
    Spine,
    Limb,
    Breast,
}

/// One Radiological Services Bureau code (`rsb_codes`): an examination.
struct Exam {
    code: &'static str,
    description: &'static str,
    minutes: i64,
    mayo_units: i64,
    fee: f64,
    rebate: f64,
    related: [Option<&'static str>; 3],
    region: Region,
}

/// The reference list of examinations, the same at every site. Fees are in
/// halves of a dollar so they are exact in an `f4`.
#[rustfmt::skip]
const EXAMS: &[Exam] = &[
    exam("C01", "Chest PA", 10, 1, 38.5, 24.0, [None, None, None], Region::Chest),
    exam("C02", "Chest PA and lateral", 15, 2, 52.0, 31.5, [Some("C01"), None, None], Region::Chest),
    exam("A01", "Abdomen supine and erect", 20, 2, 55.0, 33.0, [None, None, None], Region::Abdomen),
    exam("S01", "Skull", 20, 2, 60.5, 36.0, [None, None, None], Region::Spine),
    exam("S02", "Cervical spine", 20, 2, 58.0, 35.0, [None, None, None], Region::Spine),
    exam("S03", "Lumbar spine", 25, 3, 72.0, 43.5, [Some("S02"), None, None], Region::Spine),
    exam("E01", "Hand and wrist", 10, 1, 36.0, 22.0, [None, None, None], Region::Limb),
    exam("E02", "Knee", 10, 1, 36.0, 22.0, [None, None, None], Region::Limb),
    exam("E03", "Ankle and foot", 15, 1, 40.0, 24.5, [None, None, None], Region::Limb),
    exam("E04", "Hip and pelvis", 15, 2, 48.0, 29.0, [None, None, None], Region::Limb),
    exam("B01", "Barium meal", 40, 4, 120.0, 72.0, [Some("A01"), None, None], Region::Abdomen),
    exam("B02", "Barium enema", 45, 5, 135.5, 81.0, [Some("A01"), Some("B01"), None], Region::Abdomen),
    exam("I01", "Intravenous pyelogram", 60, 5, 150.0, 90.0, [Some("A01"), Some("U01"), None], Region::Abdomen),
    exam("U01", "Ultrasound abdomen", 30, 3, 95.0, 57.0, [None, None, None], Region::Abdomen),
    exam("M01", "Mammography", 20, 2, 70.0, 42.0, [Some("U01"), None, None], Region::Breast),
];

/// Builds an [`Exam`], so the table above reads one examination a line.
#[allow(clippy::too_many_arguments)]
const fn exam(
    code: &'static str,
    description: &'static str,
    minutes: i64,
    mayo_units: i64,
    fee: f64,
    rebate: f64,
    related: [Option<&'static str>; 3],
    region: Region,
) -> Exam {
    Exam {
        code,
        description,
        minutes,
        mayo_units,
        fee,
        rebate,
        related,
        region,
    }
}

fn findings(region: Region) -> &'static [&'static str] {
    match region {
        Region::Chest => &[
            "The heart size is within normal limits.",
            "The lungs are clear. No focal consolidation.",
            "No pleural effusion or pneumothorax is seen.",
            "Mild hyperinflation consistent with chronic airways disease.",
            "Patchy consolidation in the right lower zone, likely infective.",
            "Small left pleural effusion.",
            "Calcified granuloma in the left upper zone, unchanged.",
            "Mediastinal contours are normal.",
        ],
        Region::Abdomen => &[
            "The bowel gas pattern is normal.",
            "No free gas under the diaphragm.",
            "Several dilated loops of small bowel suggest early obstruction.",
            "Renal outlines are normal. No calculi seen.",
            "Contrast passes freely through the oesophagus and stomach.",
            "Small hiatus hernia with mild reflux.",
            "Calcified gallstones in the right upper quadrant.",
            "The liver and spleen are of normal size.",
        ],
        Region::Spine => &[
            "Vertebral body heights and alignment are maintained.",
            "Degenerative disc narrowing at L4/5 and L5/S1.",
            "No fracture or dislocation is demonstrated.",
            "Mild osteophytosis of the cervical spine.",
            "The skull vault is intact. Sinuses are clear.",
            "Facet joint arthropathy in the lower lumbar spine.",
        ],
        Region::Limb => &[
            "No fracture or dislocation.",
            "Undisplaced fracture of the distal radius.",
            "Soft tissue swelling only; no bony injury.",
            "Moderate osteoarthritis with joint space narrowing.",
            "Healing fracture with callus formation.",
            "Small joint effusion. Bones are normal.",
        ],
        Region::Breast => &[
            "Breasts are predominantly fatty. No mass seen.",
            "Benign-appearing calcification, left breast.",
            "No suspicious microcalcification or architectural distortion.",
            "Well defined opacity in the right breast; ultrasound suggested.",
        ],
    }
}

const CONCLUSIONS: &[&str] = &[
    "Comparison made with previous films.",
    "No significant change since the previous examination.",
    "Clinical correlation is suggested.",
    "Follow-up films in six weeks are suggested.",
    "Normal examination.",
];

/// A site's record of a person.
struct Patient {
    person: usize,
    /// The person as this site registered them.
    registered: Registration,
    pno: i64,
    ad_no: String,
    gp: Option<i64>,
    visits: usize,
    film_locate: &'static str,
    temporary: bool,
    old_card: bool,
    dont_destroy: bool,
    films_in_mus: bool,
    account_due: bool,
    med_insure: bool,
}

struct Visit {
    vno: i64,
    /// Index into the site's patients.
    patient: usize,
    pno: i64,
    pvno: i64,
    /// The department's running number of the visit (`dept_vno`, `rep_name`).
    seq: usize,
    day: i64,
    time: i64,
    pat_type: &'static str,
    location: String,
    refer_doctor: Option<i64>,
    hosp_consult: Option<i64>,
    exams: Vec<&'static Exam>,
    /// Exposure factors: kV, mAs, films, screening minutes; multiples of a
    /// quarter, so exact in an `f4` and short in decimal.
    roe: [f64; 4],
    radiographer: Option<String>,
    reporter: Option<String>,
    verifier: Option<String>,
    dose: i64,
    teaching_use: bool,
    report: Vec<String>,
}

/// An outgoing request: this site asks `to_site` for a patient's films.
struct Request {
    to_site: String,
    pno: i64,
    date: i64,
}

/// Everything one site holds, before it is written out as rows.
struct SiteModel {
    doctors: Vec<Doctor>,
    patients: Vec<Patient>,
    visits: Vec<Visit>,
    requests: Vec<Request>,
}

impl SiteModel {
    fn new(
        config: &NetworkConfig,
        index: usize,
        people: &People,
        scale: &Scale,
        rng: &mut Rng,
    ) -> Result<SiteModel> {
        let site = &config.sites[index];
        let first_code = site.key_range("doctor").first;
        let doctors: Vec<Doctor> = (0..scale.doctors_per_site)
            .map(|i| Doctor::new(i, first_code + i as i64, rng))
            .collect();
        let by_role = |role: Role| -> Vec<i64> {
            let of_role: Vec<i64> = doctors
                .iter()
                .filter(|d| d.role == role)
                .map(|d| d.code)
                .collect();
            if of_role.is_empty() {
                doctors.iter().map(|d| d.code).collect()
            } else {
                of_role
            }
        };
        let gps = by_role(Role::GeneralPractitioner);
        let specialists = by_role(Role::Specialist);
        let staff_of = |role: Role| -> Vec<(String, String)> {
            let of_role = |d: &&Doctor| d.role == role;
            let mut staff: Vec<&Doctor> = doctors.iter().filter(of_role).collect();
            if staff.is_empty() {
                staff = doctors.iter().collect();
            }
            staff
                .iter()
                .map(|d| {
                    (
                        d.staff.clone(),
                        format!("{} {} {}", d.title, d.initials, d.surname),
                    )
                })
                .collect()
        };
        let radiologists = staff_of(Role::Radiologist);
        let radiographers = staff_of(Role::Radiographer);

        let first_pno = site.key_range("patient").first;
        let letter = site.code.as_str().chars().next().unwrap_or('X');
        let mut patients: Vec<Patient> = people.patients[index]
            .iter()
            .enumerate()
            .map(|(i, &person)| {
                let film_locate = *rng.weighted(&[
                    ("MAIN", 60),
                    ("LIBRARY", 20),
                    ("ARCHIVE", 10),
                    ("MUSEUM", 5),
                    ("WARD", 5),
                ]);
                Patient {
                    person,
                    registered: Registration::of(&people.persons[person]),
                    pno: first_pno + i as i64,
                    ad_no: format!("{letter}{:06}", (i + 1) % 1_000_000),
                    gp: (!gps.is_empty()).then(|| *rng.pick(&gps)),
                    visits: 0,
                    film_locate,
                    temporary: rng.chance(0.1),
                    old_card: rng.chance(0.2),
                    dont_destroy: rng.chance(0.05),
                    films_in_mus: rng.chance(0.1),
                    account_due: rng.chance(0.1),
                    med_insure: rng.chance(0.3),
                }
            })
            .collect();
        // A later site's registration of a shared person may differ from the
        // first site's, drawn from a stream of its own.
        let mut vary = rng.fork(0x5245_4749);
        for p in &mut patients {
            if people.sites_of[p.person].first() != Some(&index) {
                p.registered.vary(&people.persons[p.person], &mut vary);
            }
        }

        // Draft the visits, then number them in date order as a department
        // would have.
        let (start, end) = period();
        let mut drafts: Vec<(i64, i64, usize, &str)> = Vec::new();
        for (i, patient) in patients.iter().enumerate() {
            let mut n = rng.count(scale.visits_per_patient);
            if people.sites_of[patient.person].len() > 1 {
                n = n.max(1);
            }
            let first = people.persons[patient.person].dob.max(start);
            for _ in 0..n {
                let pat_type = *rng.weighted(&[("OP", 55), ("IP", 25), ("ED", 10), ("ACC", 10)]);
                // Emergencies come at any hour, everyone else in working hours.
                let minutes = if pat_type == "ED" {
                    rng.between(0, 287) * 5
                } else {
                    rng.between(96, 215) * 5
                };
                drafts.push((rng.between(first, end), minutes, i, pat_type));
            }
        }
        drafts.sort_unstable();
        let visit_keys = need_keys(site, "visit", drafts.len())?;
        let mut visits = Vec::with_capacity(drafts.len());
        for (seq, (day, minutes, p, pat_type)) in drafts.into_iter().enumerate() {
            let patient = &mut patients[p];
            patient.visits += 1;
            let location = match pat_type {
                "IP" => format!("W{}", rng.between(1, 30)),
                "ED" => "ED".to_string(),
                _ => "OPD".to_string(),
            };
            let inpatient = matches!(pat_type, "IP" | "ED");
            let refer_doctor = if inpatient { &specialists } else { &gps };
            let mut exams = vec![rng.pick(EXAMS)];
            while exams.len() < 6 && rng.chance(0.25) {
                let more = rng.pick(EXAMS);
                if !exams.iter().any(|e| e.code == more.code) {
                    exams.push(more);
                }
            }
            let mayo: i64 = exams.iter().map(|e| e.mayo_units).sum();
            let reporter = (!radiologists.is_empty()).then(|| rng.pick(&radiologists).clone());
            let verifier = (!radiologists.is_empty()).then(|| rng.pick(&radiologists).0.clone());
            let radiographer =
                (!radiographers.is_empty()).then(|| rng.pick(&radiographers).0.clone());
            let lines = if scale.report_lines == 0 {
                0
            } else {
                1 + rng.count(scale.report_lines as f64 - 1.0)
            };
            let report = report(
                exams[0],
                reporter.as_ref().map(|r| r.1.as_str()),
                lines,
                rng,
            );
            visits.push(Visit {
                vno: visit_keys.first + seq as i64,
                patient: p,
                pno: patient.pno,
                pvno: patient.visits as i64,
                seq: seq + 1,
                day,
                time: minutes / 60 * 100 + minutes % 60,
                pat_type,
                location,
                refer_doctor: (!refer_doctor.is_empty()).then(|| *rng.pick(refer_doctor)),
                hosp_consult: (inpatient && !specialists.is_empty())
                    .then(|| *rng.pick(&specialists)),
                exams,
                roe: [
                    rng.between(12, 24) as f64 * 5.0,
                    rng.between(4, 160) as f64 * 0.5,
                    rng.between(1, 6) as f64,
                    rng.between(0, 40) as f64 * 0.25,
                ],
                radiographer,
                reporter: reporter.map(|r| r.0),
                verifier,
                dose: mayo * rng.between(5, 40),
                teaching_use: rng.chance(0.03),
                report,
            });
        }

        let requests = requests(config, index, people, &patients, &visits, rng);
        Ok(SiteModel {
            doctors,
            patients,
            visits,
            requests,
        })
    }

    /// The rows of one local relation, in its attribute order.
    fn rows(
        &self,
        config: &NetworkConfig,
        index: usize,
        relation: &Relation,
        persons: &[Person],
    ) -> Result<Vec<Vec<Value>>> {
        let site = &config.sites[index];
        match relation.name.as_str() {
            "doctor" => render(site, relation, &self.doctors, doctor_value),
            "patient" => render(site, relation, &self.patients, |p, a| {
                patient_value(p, &persons[p.person], a)
            }),
            "visit" => render(site, relation, &self.visits, visit_value),
            "visit_rep" => {
                let lines: Vec<(i64, usize, &str)> = self
                    .visits
                    .iter()
                    .flat_map(|v| {
                        v.report
                            .iter()
                            .enumerate()
                            .map(|(i, l)| (v.vno, i + 1, l.as_str()))
                    })
                    .collect();
                render(site, relation, &lines, |&(vno, line_no, line), a| match a {
                    "vno" => Some(Value::Int(vno)),
                    "line_no" => Some(Value::Int(line_no as i64)),
                    "line" => Some(Value::text(line)),
                    _ => None,
                })
            }
            "rsb_codes" => render(site, relation, EXAMS, exam_value),
            "sites" => render(site, relation, &config.sites, |s, a| {
                site_value(s, s.code == site.code, a)
            }),
            "out_go_r" => render(site, relation, &self.requests, |r, a| match a {
                "to_site" => Some(Value::text(&r.to_site)),
                "from_site" => Some(Value::text(site.code.as_str())),
                "pno" => Some(Value::Int(r.pno)),
                "date" => Some(Value::Int(yyyymmdd(r.date))),
                _ => None,
            }),
            _ => Ok(Vec::new()),
        }
    }
}

/// A visit report: the examination, findings, a conclusion and the reporting
/// radiologist, cut to `lines` lines.
fn report(exam: &Exam, reporter: Option<&str>, lines: usize, rng: &mut Rng) -> Vec<String> {
    let mut body: Vec<&str> = findings(exam.region).to_vec();
    rng.shuffle(&mut body);
    let conclusion = *rng.pick(CONCLUSIONS);
    let signature = match reporter {
        Some(name) => format!("Reported by {name}"),
        None => "Reported by the duty radiologist".to_string(),
    };
    match lines {
        0 => Vec::new(),
        1 => vec![body[0].to_string()],
        _ => {
            let mut out = vec![format!("EXAMINATION: {}", exam.description.to_uppercase())];
            let middle = lines.saturating_sub(3);
            out.extend(body.iter().cycle().take(middle).map(|s| s.to_string()));
            if lines >= 3 {
                out.push(conclusion.to_string());
            }
            out.push(signature);
            out
        }
    }
}

/// A few outgoing requests: mostly for people known to be patients at
/// another site, now and then a speculative one to any other site.
fn requests(
    config: &NetworkConfig,
    index: usize,
    people: &People,
    patients: &[Patient],
    visits: &[Visit],
    rng: &mut Rng,
) -> Vec<Request> {
    let others: Vec<usize> = (0..config.sites.len()).filter(|&s| s != index).collect();
    if others.is_empty() {
        return Vec::new();
    }
    let mut days_of: Vec<Vec<i64>> = vec![Vec::new(); patients.len()];
    for visit in visits {
        days_of[visit.patient].push(visit.day);
    }
    let (start, end) = period();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (patient, days) in patients.iter().zip(&days_of) {
        let known: Vec<usize> = people.sites_of[patient.person]
            .iter()
            .copied()
            .filter(|&s| s != index)
            .collect();
        let to = if !known.is_empty() && rng.chance(0.5) {
            *rng.pick(&known)
        } else if rng.chance(0.02) {
            *rng.pick(&others)
        } else {
            continue;
        };
        let date = if days.is_empty() {
            rng.between(start, end)
        } else {
            *rng.pick(days)
        };
        if seen.insert((to, patient.pno, date)) {
            out.push(Request {
                to_site: config.sites[to].code.to_string(),
                pno: patient.pno,
                date,
            });
        }
    }
    out
}

/// Writes `items` as rows of `relation`: `value` gives an item's value of an
/// attribute (`None` when the generator does not know the attribute), and
/// every value is checked against the attribute's type.
fn render<T>(
    site: &SiteConfig,
    relation: &Relation,
    items: &[T],
    value: impl Fn(&T, &str) -> Option<Value>,
) -> Result<Vec<Vec<Value>>> {
    let names: Vec<String> = relation
        .attributes
        .iter()
        .map(|a| format!("{}.{}", relation.name, a.name))
        .collect();
    items
        .iter()
        .map(|item| {
            relation
                .attributes
                .iter()
                .zip(&names)
                .map(|(attribute, what)| {
                    let v = value(item, &attribute.name).unwrap_or(Value::Null);
                    if v.is_null() && attribute.not_null {
                        return Err(Error::Value(format!(
                            "site {}: the generator has no value for {what}, which may not be null",
                            site.code
                        )));
                    }
                    attribute
                        .ty
                        .check(v, what)
                        .map_err(|e| Error::Value(format!("site {}: {e}", site.code)))
                })
                .collect()
        })
        .collect()
}

fn doctor_value(d: &Doctor, attribute: &str) -> Option<Value> {
    Some(match attribute {
        "code" => Value::Int(d.code),
        "title" => Value::text(d.title),
        "initials" => Value::text(&d.initials),
        "surname" => Value::text(d.surname),
        "add1" => Value::text(&d.address[0]),
        "add2" => Value::text(&d.address[1]),
        "add3" => Value::text(&d.address[2]),
        "phone" => Value::text(&d.phone),
        _ => return None,
    })
}

fn patient_value(p: &Patient, person: &Person, attribute: &str) -> Option<Value> {
    Some(match attribute {
        "pno" => Value::Int(p.pno),
        "ad_no" => Value::text(&p.ad_no),
        "title" => Value::text(p.registered.title),
        "surname" => Value::text(&p.registered.surname),
        "first_names" => Value::text(&p.registered.first_names),
        "dob" => Value::Int(p.registered.dob),
        "sex" => Value::text(if person.male { "M" } else { "F" }),
        "race" => Value::text(person.race),
        "add1" => Value::text(&p.registered.address[0]),
        "add2" => Value::text(&p.registered.address[1]),
        "add3" => Value::text(&p.registered.address[2]),
        "post_mortem" => yes_no(person.post_mortem),
        "dod" => int_or_null(person.dod.map(yyyymmdd)),
        "vip" => yes_no(person.vip),
        "contrast_sen" => yes_no(person.contrast_sen),
        "gp" => int_or_null(p.gp),
        "no_of_visits" => Value::Int(p.visits as i64),
        "film_locate" => Value::text(p.film_locate),
        "perm_temp" => Value::text(if p.temporary { "T" } else { "P" }),
        "old_card" => yes_no(p.old_card),
        "dont_destroy" => yes_no(p.dont_destroy),
        "films_in_mus" => yes_no(p.films_in_mus),
        "account_due" => yes_no(p.account_due),
        "med_insure" => yes_no(p.med_insure),
        _ => return None,
    })
}

fn visit_value(v: &Visit, attribute: &str) -> Option<Value> {
    let text_or_null = |s: &Option<String>| s.as_deref().map_or(Value::Null, Value::text);
    Some(match attribute {
        "vno" => Value::Int(v.vno),
        "pno" => Value::Int(v.pno),
        "pvno" => Value::Int(v.pvno),
        "dept_vno" => Value::Text(format!("XR{:06}", v.seq % 1_000_000)),
        "date" => Value::Int(yyyymmdd(v.day)),
        "time" => Value::Int(v.time),
        // Ward codes are at most four characters, so they survive the
        // global snapshot's c4 pat_location.
        "pat_location" => Value::text(&v.location),
        "pat_type" => Value::text(v.pat_type),
        "refer_doctor" => int_or_null(v.refer_doctor),
        "hosp_consult" => int_or_null(v.hosp_consult),
        "description" => Value::text(v.exams[0].description),
        "rsb1" | "rsb2" | "rsb3" | "rsb4" | "rsb5" | "rsb6" => {
            let n: usize = attribute[3..].parse().ok()?;
            v.exams
                .get(n - 1)
                .map_or(Value::Null, |e| Value::text(e.code))
        }
        "roe1" | "roe2" | "roe3" | "roe4" => {
            let n: usize = attribute[3..].parse().ok()?;
            Value::Float(v.roe[n - 1])
        }
        "radgrapher" => text_or_null(&v.radiographer),
        "radiation_do" => Value::Int(v.dose),
        "rad_report" => text_or_null(&v.reporter),
        "rad_verify" => text_or_null(&v.verifier),
        "mayo_units" => Value::Int(v.exams.iter().map(|e| e.mayo_units).sum()),
        "films_destry" => yes_no(false),
        "teaching_use" => yes_no(v.teaching_use),
        "rep_name" => Value::Text(format!("R{:07}", v.seq % 10_000_000)),
        // Reports older than 1986 were compressed to save disc space.
        "compressed" => yes_no(v.day < day_of(1986, 1, 1)),
        _ => return None,
    })
}

fn exam_value(e: &Exam, attribute: &str) -> Option<Value> {
    let related = |i: usize| e.related[i].map_or(Value::Null, Value::text);
    Some(match attribute {
        "rsb_code" => Value::text(e.code),
        "description" => Value::text(e.description),
        "time_req" => Value::Int(e.minutes),
        "mayo_units" => Value::Int(e.mayo_units),
        "exam_total_f" => Value::Float(e.fee),
        "rsb_rebate" => Value::Float(e.rebate),
        "code_1" => related(0),
        "code_2" => related(1),
        "code_3" => related(2),
        _ => return None,
    })
}

/// A row of `sites`, derived from the configuration only, so every site holds
/// the same rows (apart from `this_site`).
fn site_value(s: &SiteConfig, this_site: bool, attribute: &str) -> Option<Value> {
    let n = u64::from(s.number.0);
    let pick =
        |list: &[&'static str], salt: u64| list[(mix(n ^ salt) % list.len() as u64) as usize];
    Some(match attribute {
        "code" => Value::text(s.code.as_str()),
        "int_code" => Value::Int(i64::from(s.number.0)),
        "name" => Value::text(&s.name),
        "this_site" => yes_no(this_site),
        "add1" => Value::Text(format!("{} {}", 1 + mix(n) % 299, pick(STREETS, 1))),
        "add2" => Value::text(pick(SUBURBS, 2)),
        "add3" => Value::text("Christchurch"),
        "phone" => Value::Text(format!("03-3{:06}", mix(n ^ 3) % 1_000_000)),
        "discount" => Value::text(pick(&["0", "5", "10"], 4)),
        "dept_vno" => Value::text("XR"),
        "gst_no" => {
            let g = mix(n ^ 5) % 100_000_000;
            Value::Text(format!(
                "{:02}-{:03}-{:03}",
                g / 1_000_000,
                g / 1_000 % 1_000,
                g % 1_000
            ))
        }
        "acc_no" => Value::Text(format!("03-0802-{:07}", mix(n ^ 6) % 10_000_000)),
        "label_addr" => Value::text("LP1"),
        "recpt_addr" => Value::text("LP2"),
        "inv_addr" => Value::text("LP3"),
        "print_labels" => yes_no(true),
        "print_rec" => yes_no(true),
        "print_inv" => yes_no(n % 2 == 1),
        "skip_rep_lin" => Value::Int(6),
        "exit_recpt" => Value::Int(0),
        "exit_radio" => Value::Int(0),
        "no_labels" => Value::Int(3),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_output() {
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(day_of(1970, 1, 1), 0);
        assert_eq!(yyyymmdd(day_of(1987, 12, 12)), 19871212);
        assert_eq!(yyyymmdd(day_of(1988, 2, 29) + 1), 19880301);
        assert_eq!(yyyymmdd(day_of(1900, 3, 1) - 1), 19000228);
        for day in day_of(1890, 1, 1)..day_of(1990, 1, 1) {
            let d = yyyymmdd(day);
            assert_eq!(day_of(d / 10_000, d / 100 % 100, d % 100), day);
        }
    }

    #[test]
    fn counts_have_the_asked_mean() {
        let mut rng = Rng::new(7);
        let total: usize = (0..10_000).map(|_| rng.count(2.0)).sum();
        assert!((19_000..21_000).contains(&total), "{total}");
        assert_eq!(rng.count(0.0), 0);
    }

    #[test]
    fn reports_have_the_asked_length_and_fit_c80() {
        let mut rng = Rng::new(1);
        for lines in 0..12 {
            for exam in EXAMS {
                let r = report(exam, Some("Dr J.R. Fa'asavalu"), lines, &mut rng);
                assert_eq!(r.len(), lines);
                assert!(r.iter().all(|l| l.chars().count() <= 80), "{r:?}");
            }
        }
    }
}
