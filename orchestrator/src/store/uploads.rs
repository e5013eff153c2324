//! Uploaded files (images for now): checked by their bytes, stored in the database, readable by
//! their owner.

use agentplane_actors::ports::StoreError;
use agentplane_schema::api::FileInfo;
use agentplane_schema::db::entities::files;
use agentplane_schema::new_id;
use chrono::Utc;
use sea_orm::{EntityTrait, QuerySelect};
use sha2::{Digest, Sha256};

use super::{DbStore, db_err};

/// Largest image accepted: 10 MiB.
pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// The image formats models take, told apart by their first bytes (never by the claimed type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Png,
    Jpeg,
    Gif,
    Webp,
}

impl ImageKind {
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageKind::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageKind::Jpeg)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageKind::Gif)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageKind::Webp)
        } else {
            None
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            ImageKind::Png => "image/png",
            ImageKind::Jpeg => "image/jpeg",
            ImageKind::Gif => "image/gif",
            ImageKind::Webp => "image/webp",
        }
    }
}

fn info(r: &files::Model) -> FileInfo {
    FileInfo {
        id: r.id.clone(),
        content_type: r.content_type.clone(),
        size: r.size,
        sha256: r.sha256.clone(),
        created_at: r.created_at,
    }
}

impl DbStore {
    /// Stores an image whose kind was already sniffed.
    pub async fn create_file(&self, owner_id: &str, kind: ImageKind, bytes: Vec<u8>) -> Result<FileInfo, StoreError> {
        let row = files::Model {
            id: new_id(),
            owner_id: owner_id.to_string(),
            content_type: kind.media_type().to_string(),
            size: bytes.len() as i64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes,
            created_at: Utc::now(),
        };
        let file = info(&row);
        files::Entity::insert(files::ActiveModel::from(row)).exec_without_returning(&self.db).await.map_err(db_err)?;
        Ok(file)
    }

    /// A file's description, without its bytes.
    pub async fn file_info(&self, id: &str) -> Result<Option<(FileInfo, String)>, StoreError> {
        let row = files::Entity::find_by_id(id)
            .select_only()
            .columns([
                files::Column::Id,
                files::Column::OwnerId,
                files::Column::ContentType,
                files::Column::Size,
                files::Column::Sha256,
                files::Column::CreatedAt,
            ])
            .into_tuple::<(String, String, String, i64, String, chrono::DateTime<Utc>)>()
            .one(&self.db)
            .await
            .map_err(db_err)?;
        Ok(row.map(|(id, owner, content_type, size, sha256, created_at)| {
            (FileInfo { id, content_type, size, sha256, created_at }, owner)
        }))
    }

    /// A file with its bytes and owner.
    pub async fn file(&self, id: &str) -> Result<Option<files::Model>, StoreError> {
        files::Entity::find_by_id(id).one(&self.db).await.map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::ImageKind;

    #[test]
    fn images_are_told_apart_by_their_bytes() {
        assert_eq!(ImageKind::sniff(b"\x89PNG\r\n\x1a\n rest"), Some(ImageKind::Png));
        assert_eq!(ImageKind::sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]), Some(ImageKind::Jpeg));
        assert_eq!(ImageKind::sniff(b"GIF89a...."), Some(ImageKind::Gif));
        assert_eq!(ImageKind::sniff(b"RIFF\x10\0\0\0WEBPVP8 "), Some(ImageKind::Webp));
        assert_eq!(ImageKind::sniff(b"RIFF\x10\0\0\0WAVEfmt "), None);
        assert_eq!(ImageKind::sniff(b"<svg xmlns=..."), None);
        assert_eq!(ImageKind::sniff(b"\x89PN"), None);
        assert_eq!(ImageKind::sniff(b""), None);
    }
}
