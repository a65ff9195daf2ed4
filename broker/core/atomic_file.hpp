// Atomic replacement of small state files: write a temporary file in the same directory, rename
// it over the target. A crash of the process leaves the old or the new content, never a torn
// file. With Sync::host the temporary file and the directory are also fsynced, so a crash of the
// whole host leaves the old or the new content as well.
#pragma once

#include <optional>
#include <string>
#include <system_error>
#include <vector>

namespace broker {

// What a completed write must survive.
enum class Sync {
  host,     // a crash of the host: fsync before and after the rename
  process,  // a crash of this process: the page cache holds the data, no fsync
};

std::error_code write_file_atomic(const std::string& dir, const std::string& name,
                                  std::string_view content, unsigned mode = 0600,
                                  Sync sync = Sync::host);
std::error_code remove_file_durable(const std::string& dir, const std::string& name,
                                    Sync sync = Sync::host);
std::optional<std::string> read_small_file(const std::string& path, std::size_t limit = 1 << 20);
// Creates `path` and its parents with `mode` (existing directories are left as they are).
std::error_code make_dirs(const std::string& path, unsigned mode = 0700);
// Names in `dir` (no "." / ".."), empty when dir does not exist.
std::vector<std::string> list_dir(const std::string& dir);

}  // namespace broker
