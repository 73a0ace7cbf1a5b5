//! Values both the order and inventory services accept from the outside world,
//! parsed once at the edge ("parse, don't validate").

use std::fmt;

/// A stock keeping unit: 1–64 characters of `A–Z a–z 0–9 . _ -`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sku(String);

pub const SKU_MAX_LEN: usize = 64;

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".into());
        }
        if raw.chars().count() > SKU_MAX_LEN {
            return Err(format!("must be at most {SKU_MAX_LEN} characters"));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "contains '{}'; allowed are A-Z a-z 0-9 . _ -",
                bad.escape_debug()
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many units of one SKU an order line asks for: 1 to 10 000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(u32);

pub const QUANTITY_MAX: u32 = 10_000;

impl Quantity {
    pub fn parse(raw: i64) -> Result<Self, String> {
        match u32::try_from(raw) {
            Ok(q) if (1..=QUANTITY_MAX).contains(&q) => Ok(Self(q)),
            _ => Err(format!("must be between 1 and {QUANTITY_MAX}, got {raw}")),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_short_and_plain() {
        assert!(Sku::parse("SKU-1_a.b").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("has space").is_err());
        assert!(Sku::parse("ü").is_err());
        assert!(Sku::parse(&"x".repeat(64)).is_ok());
        assert!(Sku::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn quantities_are_bounded() {
        assert_eq!(Quantity::parse(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::parse(10_000).map(Quantity::get), Ok(10_000));
        for bad in [0, -1, 10_001, i64::MAX, i64::MIN] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
    }
}
