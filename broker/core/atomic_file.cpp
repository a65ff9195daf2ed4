#include "broker/core/atomic_file.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "fdpass/unique_fd.hpp"

namespace broker {
namespace {

std::error_code errno_code() { return {errno, std::system_category()}; }

std::error_code fsync_dir(const std::string& dir) {
  fdpass::UniqueFd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!d || ::fsync(d.get()) != 0) return errno_code();
  return {};
}

}  // namespace

std::error_code write_file_atomic(const std::string& dir, const std::string& name,
                                  std::string_view content, unsigned mode, Sync sync) {
  std::string target = dir + "/" + name;
  std::string temp = dir + "/." + name + ".tmp";
  fdpass::UniqueFd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                             mode));
  if (!fd) return errno_code();
  std::size_t off = 0;
  while (off < content.size()) {
    ssize_t n = ::write(fd.get(), content.data() + off, content.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      auto ec = errno_code();
      ::unlink(temp.c_str());
      return ec;
    }
    off += static_cast<std::size_t>(n);
  }
  if ((sync == Sync::host && ::fsync(fd.get()) != 0) ||
      ::rename(temp.c_str(), target.c_str()) != 0) {
    auto ec = errno_code();
    ::unlink(temp.c_str());
    return ec;
  }
  return sync == Sync::host ? fsync_dir(dir) : std::error_code();
}

std::error_code remove_file_durable(const std::string& dir, const std::string& name, Sync sync) {
  if (::unlink((dir + "/" + name).c_str()) != 0 && errno != ENOENT) return errno_code();
  return sync == Sync::host ? fsync_dir(dir) : std::error_code();
}

std::optional<std::string> read_small_file(const std::string& path, std::size_t limit) {
  fdpass::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return std::nullopt;
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return std::nullopt;
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
    if (out.size() > limit) return std::nullopt;
  }
  return out;
}

std::error_code make_dirs(const std::string& path, unsigned mode) {
  for (std::size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    std::string part = path.substr(0, pos);
    if (::mkdir(part.c_str(), mode) != 0 && errno != EEXIST) return errno_code();
  }
  return {};
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(std::move(n));
  }
  ::closedir(d);
  return names;
}

}  // namespace broker
