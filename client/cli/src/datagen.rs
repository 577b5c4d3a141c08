//! A deterministic generator of chat-platform data for the demo, the
//! benchmark and the tests: JSONL chat logs (English, Chinese, emoji), gift
//! CSVs, profile tables, incompressible media, and the awkward cases (an
//! empty file, an empty directory, a symlink, odd permissions).

use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORDS: &[&str] = &[
    "hello",
    "gg",
    "lol",
    "nice",
    "stream",
    "today",
    "wow",
    "love",
    "this",
    "song",
    "again",
    "666",
    "哈哈哈",
    "主播",
    "好看",
    "礼物",
    "谢谢",
    "来了",
    "加油",
    "🔥",
    "❤️",
    "😂",
    "👏",
    "🎉",
];

fn message(rng: &mut StdRng, room: u32, t: u64) -> String {
    let words = rng.gen_range(2..14);
    let text: Vec<&str> = (0..words)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect();
    format!(
        "{{\"ts\":{t},\"room\":{room},\"user\":{},\"type\":\"chat\",\"text\":\"{}\"}}\n",
        rng.gen_range(1..200_000),
        text.join(" ")
    )
}

/// Writes about `size_mb` MiB of chat data under `dir`.
pub fn generate(dir: &Path, size_mb: u64, seed: u64) -> std::io::Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let budget = size_mb * 1024 * 1024;
    let mut written = 0u64;
    std::fs::create_dir_all(dir.join("chat"))?;
    std::fs::create_dir_all(dir.join("gifts"))?;
    std::fs::create_dir_all(dir.join("users"))?;
    std::fs::create_dir_all(dir.join("media"))?;
    std::fs::create_dir_all(dir.join("exports/empty"))?;
    // chat logs: ~70%
    let rooms = (budget / (512 * 1024)).clamp(4, 2000) as u32;
    let per_room = budget * 70 / 100 / u64::from(rooms);
    for room in 0..rooms {
        let room_dir = dir.join(format!("chat/room={room:06}"));
        std::fs::create_dir_all(&room_dir)?;
        for day in 0..3 {
            let mut file = std::io::BufWriter::new(std::fs::File::create(
                room_dir.join(format!("2026-11-{:02}.jsonl", 19 + day)),
            )?);
            let mut n = 0u64;
            let mut t = 1_763_500_000_000 + day * 86_400_000;
            while n < per_room / 3 {
                t += rng.gen_range(10..5000);
                let line = message(&mut rng, room, t);
                n += line.len() as u64;
                file.write_all(line.as_bytes())?;
            }
            written += n;
        }
    }
    // gifts and profiles: ~15%
    for day in 0..3 {
        let mut file = std::io::BufWriter::new(std::fs::File::create(
            dir.join(format!("gifts/2026-11-{:02}.csv", 19 + day)),
        )?);
        file.write_all(b"ts,from_user,to_streamer,gift,coins\n")?;
        let mut n = 0u64;
        while n < budget * 5 / 100 / 3 {
            let line = format!(
                "{},{},{},{},{}\n",
                1_763_500_000 + rng.gen_range(0..86_400),
                rng.gen_range(1..200_000),
                rng.gen_range(1..5_000),
                ["rose", "rocket", "castle", "heart", "panda"][rng.gen_range(0..5)],
                rng.gen_range(1..10_000)
            );
            n += line.len() as u64;
            file.write_all(line.as_bytes())?;
        }
        written += n;
    }
    let mut profiles =
        std::io::BufWriter::new(std::fs::File::create(dir.join("users/profiles.csv"))?);
    let mut n = 0u64;
    let mut uid = 0u64;
    while n < budget * 10 / 100 {
        uid += 1;
        let line = format!(
            "{uid},user{uid},{},{}\n",
            ["zh-CN", "en-US", "ja-JP"][rng.gen_range(0..3)],
            rng.gen_range(0..100)
        );
        n += line.len() as u64;
        profiles.write_all(line.as_bytes())?;
    }
    written += n;
    drop(profiles);
    // media: ~15%, incompressible, one duplicate
    let media_budget = budget * 15 / 100;
    let mut m = 0u64;
    let mut i = 0;
    while m < media_budget {
        let len = rng
            .gen_range(20_000..400_000usize)
            .min((media_budget - m) as usize + 1);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        bytes[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
        std::fs::write(dir.join(format!("media/{i:05}.jpg")), &bytes)?;
        if i == 0 {
            std::fs::write(dir.join("media/reupload.jpg"), &bytes)?;
        }
        m += len as u64;
        i += 1;
    }
    written += m;
    // edge cases
    std::fs::write(dir.join("exports/empty.txt"), b"")?;
    std::os::unix::fs::symlink("../users/profiles.csv", dir.join("exports/latest-profiles"))?;
    let secret = dir.join("exports/private.txt");
    std::fs::write(&secret, b"only the owner may read this\n")?;
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(written)
}

/// Appends a day of activity to about `percent`% of the chat logs.
pub fn mutate(dir: &Path, percent: u32, seed: u64) -> std::io::Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut logs = Vec::new();
    for room in std::fs::read_dir(dir.join("chat"))? {
        for day in std::fs::read_dir(room?.path())? {
            logs.push(day?.path());
        }
    }
    logs.sort();
    let count = (logs.len() * percent as usize).div_ceil(100).max(1);
    let mut appended = 0u64;
    for _ in 0..count {
        let path = &logs[rng.gen_range(0..logs.len())];
        let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
        for _ in 0..rng.gen_range(20..200) {
            let t = 1_763_800_000_000 + rng.gen_range(0..86_400_000);
            let line = message(&mut rng, 0, t);
            appended += line.len() as u64;
            file.write_all(line.as_bytes())?;
        }
    }
    Ok(appended)
}
