//! A small owned, row-major `f32` matrix: the exchange type between adapter I/O, the merge
//! engine and the model engine. Row-major matches safetensors and candle, so tensors move in
//! and out without reordering; faer views it through strides for the linear algebra.

use faer::{MatMut, MatRef};

/// Row-major `rows × cols` matrix of `f32`.
#[derive(Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Matrix({}x{})", self.rows, self.cols)
    }
}

/// `data.len()` did not equal `rows * cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} values cannot form a {rows}x{cols} matrix")]
pub struct ShapeError {
    pub rows: usize,
    pub cols: usize,
    pub len: usize,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, ShapeError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(ShapeError {
                rows,
                cols,
                len: data.len(),
            });
        }
        Ok(Self { rows, cols, data })
    }

    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> f32) -> Self {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(f(i, j));
            }
        }
        Self { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Size of the values in bytes.
    pub fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    pub fn as_faer(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.data, self.rows, self.cols)
    }

    pub fn as_faer_mut(&mut self) -> MatMut<'_, f32> {
        MatMut::from_row_major_slice_mut(&mut self.data, self.rows, self.cols)
    }

    /// Copies any faer matrix view into a new row-major matrix.
    pub fn from_faer<T: Copy + Into<f64>>(m: MatRef<'_, T>) -> Self {
        let (rows, cols) = (m.nrows(), m.ncols());
        let mut data = vec![0.0f32; rows * cols];
        // A band of columns at a time, so each written row segment fills whole cache lines while
        // the band's columns are read in order (column-major views); a view whose rows are
        // contiguous (a transposed column-major matrix) is one band, copied row by row.
        const BAND: usize = 16;
        let band_width = if m.col_stride() == 1 { cols } else { BAND };
        for j0 in (0..cols).step_by(band_width.max(1)) {
            let band = m.subcols(j0, band_width.min(cols - j0));
            for i in 0..rows {
                let out = &mut data[i * cols + j0..i * cols + j0 + band.ncols()];
                for (o, &x) in out.iter_mut().zip(band.row(i).iter()) {
                    *o = x.into() as f32;
                }
            }
        }
        Self { rows, cols, data }
    }

    /// `self · other` (`rows × other.cols`), computed by faer.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows, "matmul inner dimensions");
        let mut out = Matrix::zeros(self.rows, other.cols);
        faer::linalg::matmul::matmul(
            out.as_faer_mut(),
            faer::Accum::Replace,
            self.as_faer(),
            other.as_faer(),
            1.0f32,
            faer::Par::rayon(0),
        );
        out
    }

    /// Multiplies every value by `factor`.
    pub fn scale(&mut self, factor: f32) {
        self.data.iter_mut().for_each(|x| *x *= factor);
    }

    /// Frobenius norm, accumulated in f64.
    pub fn frobenius(&self) -> f64 {
        self.data
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    /// `‖self − other‖_F / ‖other‖_F` (absolute error when `other` is zero).
    pub fn relative_error(&self, other: &Matrix) -> f64 {
        assert_eq!(self.shape(), other.shape(), "relative_error shapes");
        let diff: f64 = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm = other.frobenius();
        if norm > 0.0 { diff / norm } else { diff }
    }

    /// Stacks matrices with the same number of columns on top of each other.
    pub fn vstack<'a>(parts: impl IntoIterator<Item = &'a Matrix>, cols: usize) -> Matrix {
        let mut data = Vec::new();
        let mut rows = 0;
        for part in parts {
            assert_eq!(part.cols, cols, "vstack column count");
            data.extend_from_slice(&part.data);
            rows += part.rows;
        }
        Matrix { rows, cols, data }
    }

    /// Places matrices with the same number of rows side by side.
    pub fn hstack<'a>(parts: impl IntoIterator<Item = &'a Matrix> + Clone, rows: usize) -> Matrix {
        let cols: usize = parts.clone().into_iter().map(|p| p.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for part in parts.clone() {
                assert_eq!(part.rows, rows, "hstack row count");
                data.extend_from_slice(part.row(i));
            }
        }
        Matrix { rows, cols, data }
    }

    pub fn transpose(&self) -> Matrix {
        Matrix::from_fn(self.cols, self.rows, |i, j| self.data[j * self.cols + i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faer_views_of_either_layout_copy_to_the_same_matrix() {
        let m = faer::Mat::<f64>::from_fn(37, 21, |i, j| (i * 100 + j) as f64);
        let t = faer::Mat::<f64>::from_fn(21, 37, |i, j| (j * 100 + i) as f64);
        // Column-major, and the transpose of a column-major matrix (rows contiguous).
        for copy in [
            Matrix::from_faer(m.as_ref()),
            Matrix::from_faer(t.transpose()),
        ] {
            assert_eq!((copy.rows(), copy.cols()), (37, 21));
            for i in 0..37 {
                for j in 0..21 {
                    assert_eq!(copy.row(i)[j], (i * 100 + j) as f32);
                }
            }
        }
        assert_eq!(
            Matrix::from_faer(faer::Mat::<f64>::zeros(3, 0).as_ref()).rows(),
            3
        );
    }
}
