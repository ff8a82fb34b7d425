//! The schema checks' building blocks, shared by the specs parsed with line numbers (Istio's
//! `AuthorizationPolicy`, Gateway API routes): a struct read from its fields then checked as a
//! whole ([`Checked`]), list fields where `null` reads as empty ([`List`]), and values parsed from
//! strings or numbers ([`Parsed`]). An error raised inside a value's visit carries the value's
//! field path and line (`serde_yaml` adds both).

use std::{fmt, marker::PhantomData, str::FromStr};

use serde::{
    de::{self, value::MapAccessDeserializer, DeserializeOwned, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};

/// A spec struct read by the derived `Deserialize` of its `Fields` (which refuse unknown
/// fields), then checked as a whole inside the visit of its mapping, so that a check's error
/// carries the mapping's path and line. `null` is refused.
pub(crate) trait Checked: Sized {
    /// Why a value is refused.
    type Error: fmt::Display;
    type Fields: DeserializeOwned;
    /// What it is, for error messages (`a rule`).
    const WHAT: &'static str;
    fn check(fields: Self::Fields) -> Result<Self, Self::Error>;
}

/// Implements `Deserialize` through [`Checked`] for each type.
macro_rules! checked {
    ($($ty:ty),*) => {$(
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                crate::schema::deserialize_checked(deserializer)
            }
        }
    )*};
}
pub(crate) use checked;

pub(crate) fn deserialize_checked<'de, T: Checked, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    struct CheckedVisitor<T>(PhantomData<T>);
    impl<'de, T: Checked> Visitor<'de> for CheckedVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(T::WHAT)
        }
        fn visit_unit<E: de::Error>(self) -> Result<T, E> {
            Err(E::custom(format_args!(
                "must not be null: expected {}",
                T::WHAT
            )))
        }
        fn visit_none<E: de::Error>(self) -> Result<T, E> {
            self.visit_unit()
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let fields = T::Fields::deserialize(MapAccessDeserializer::new(map))?;
            T::check(fields).map_err(de::Error::custom)
        }
    }
    deserializer.deserialize_any(CheckedVisitor(PhantomData))
}

/// A list field: `null` reads as empty; with `NON_EMPTY`, `[]` is refused (as Istio does for
/// `from` and `to`).
pub(crate) struct List<T, const NON_EMPTY: bool = false>(pub(crate) Vec<T>);

impl<T, const NON_EMPTY: bool> Default for List<T, NON_EMPTY> {
    fn default() -> Self {
        List(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>, const NON_EMPTY: bool> Deserialize<'de> for List<T, NON_EMPTY> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_option(ListVisitor(PhantomData))
    }
}

struct ListVisitor<T, const NON_EMPTY: bool>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const NON_EMPTY: bool> Visitor<'de> for ListVisitor<T, NON_EMPTY> {
    type Value = List<T, NON_EMPTY>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(List::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(List::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        if NON_EMPTY && items.is_empty() {
            return Err(de::Error::custom(
                "must not be an empty list (leave the field out instead)",
            ));
        }
        Ok(List(items))
    }
}

/// The values of a list field of [`Parsed`] values.
pub(crate) fn values<T: Into<U>, U>(list: List<Parsed<T>>) -> Vec<U> {
    list.0.into_iter().map(|value| value.0.into()).collect()
}

/// A value parsed with [`FromStr`] from a string, or from an integer's digits (`values: [8080]`),
/// inside the visit of the value so that an error names its index and line.
pub(crate) struct Parsed<T>(pub(crate) T);

impl<'de, T: FromStr<Err: fmt::Display>> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ParsedVisitor<T>(PhantomData<T>);
        impl<T: FromStr<Err: fmt::Display>> Visitor<'_> for ParsedVisitor<T> {
            type Value = Parsed<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Parsed<T>, E> {
                v.parse().map(Parsed).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Parsed<T>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Parsed<T>, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_any(ParsedVisitor(PhantomData))
    }
}
